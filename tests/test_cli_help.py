"""The commands explain themselves: every flag has a description and a default, `mf-train --preset P --help`
shows P's values, and the BOOL/TUPLE/DICT syntax is documented (all in-process, no training)."""
import dataclasses, re
from meanflow_nb.config import field_docs, TrainConfig, get_config, PRESETS, _flag_str
from meanflow_nb.cli import train_parser, sample_parser


def flags(p): return [a for a in p._actions if a.option_strings and a.dest != 'help']


def test_train_help_describes_every_field():
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name != 'preset' and not docs.get(f.name)]
    assert not missing, f'TrainConfig fields without a comment (their --help is empty): {missing}'
    for a in flags(train_parser()):
        assert a.help and len(a.help.split('(default:')[0].strip()) >= 3, a.dest


def test_train_help_shows_the_presets_values():
    for preset in ('toy2d', 'digits'):
        cfg, p = get_config(preset), train_parser(preset)
        for a in flags(p):
            if a.dest != 'preset' and a.dest in {f.name for f in dataclasses.fields(TrainConfig)}:
                assert a.help.endswith(f'(default: {_flag_str(getattr(cfg, a.dest))})'.replace('%', '%%')), (preset, a.dest, a.help)
    assert get_config('digits').lr != TrainConfig().lr  # so the check above can tell the two apart
    h = train_parser().format_help()
    for kind in ('BOOL', 'TUPLE', 'DICT'): assert re.search(rf'^  {kind} ', h, re.M), kind


def test_sample_help_has_description_and_default_for_every_flag():
    for a in flags(sample_parser()):
        assert a.help and 'default' in a.help, a.option_strings
