"""Packaging for meanflow_nb: every setting comes from settings.ini, which nbdev reads too."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

licenses = {'apache2': 'Apache-2.0'}  # an SPDX expression (license classifiers are deprecated)
spdx = licenses[cfg['license']]
# PEP 639 metadata (License-Expression) needs setuptools >= 77, which pyproject.toml's build-system requires; an older
# setuptools (a --no-build-isolation build in an old venv) writes the plain License field instead.
license_kw = {'license_expression': spdx} if int(setuptools.__version__.split('.')[0]) >= 77 else {'license': spdx}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

min_python = cfg['min_python']
requirements = cfg.get('requirements', '').split()
dev_requirements = cfg.get('dev_requirements', '').split()
scripts = [s.strip() for s in cfg.get('console_scripts', '').splitlines() if s.strip()]

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],  # the one place the version lives: settings.ini (nbdev_export copies it into __init__.py)
    **license_kw, license_files=['LICENSE'],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()] +
                ['Programming Language :: Python :: ' + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    project_urls={'Documentation': cfg['doc_host'] + cfg['doc_baseurl'], 'Source': cfg['git_url'],
                  'Changelog': f"{cfg['git_url']}/blob/{cfg['branch']}/CHANGELOG.md"},
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']),
    # assets/ (the digits classifier's weights) is a data folder of the package, not a package: declared as package
    # data, not collected from MANIFEST.in (include_package_data), which setuptools warns will stop shipping it.
    package_data={cfg['lib_name']: ['assets/*']},
    include_package_data=False,
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    author=cfg['author'], author_email=cfg['author_email'],
    description=cfg['description'], keywords=cfg['keywords'],
)
