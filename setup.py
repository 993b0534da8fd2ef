import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


PTH_FILE = "llamafactory_minorsft.pth"


class BuildPyWithPth(build_py):
    """Ship ``llamafactory_minorsft.pth`` at the root of site-packages.

    Python executes the ``import`` line of every ``.pth`` file at start-up, so each interpreter of the
    environment (``llamafactory-cli``, torchrun and DeepSpeed children, the web UI) gets the stages
    registered without any import by the user. The line itself only installs a lazy post-import hook.
    """

    def run(self):
        super().run()
        self.copy_file(PTH_FILE, os.path.join(self.build_lib, PTH_FILE))


def get_version() -> str:
    with open(os.path.join("llamafactory_minorsft", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "(.+)"$', f.read(), re.M).group(1)


setup(
    name="llamafactory-minorsft",
    version=get_version(),
    description="MinorSFT, SFT-using-DPO and the deviation metric (arXiv 2408.10642) as LLaMA-Factory stages",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["llamafactory_minorsft", "llamafactory_minorsft.*"]),
    install_requires=["llamafactory>=0.9.4"],
    cmdclass={"build_py": BuildPyWithPth},
    entry_points={"console_scripts": ["llamafactory-minorsft = llamafactory_minorsft.tools.cli:main"]},
)
