"""Build hook of `wmpo-robot`: ship `wmpo.v1` and `wmpo.common`'s codec from their folders in this repository.

`pip install ./services/robot` builds the wheel from here, reading ``../../proto/wmpo/v1`` and
``../common/wmpo/common`` in place. An sdist cannot point outside itself, so `SdistWithShared` copies those
files under ``shared/`` in the archive, and a build from the sdist reads them there.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup  # type: ignore[import-untyped, unused-ignore]
from setuptools.command.sdist import sdist  # type: ignore[import-untyped, unused-ignore]

HERE = Path(__file__).resolve().parent
IN_REPOSITORY = {"wmpo.common": "../common/wmpo/common", "wmpo.v1": "../../proto/wmpo/v1"}
COPIES = "shared"


def folder(package: str) -> str:
    """Where `package`'s files are: the sdist's copy if there is one, else the repository folder."""
    copy = Path(COPIES, *package.split("."))
    return copy.as_posix() if (HERE / copy).is_dir() else IN_REPOSITORY[package]


class SdistWithShared(sdist):  # type: ignore[misc, unused-ignore]
    """An sdist that carries the files from outside this folder under ``shared/`` (not beside the archive)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        outside = {f for f in files if f.startswith("../")}
        super().make_release_tree(base_dir, [f for f in files if f not in outside])
        for name in sorted(outside):
            package, source = next((p, d) for p, d in IN_REPOSITORY.items() if name.startswith(d + "/"))
            target = Path(base_dir, COPIES, *package.split("."), name[len(source) + 1 :])
            self.mkpath(str(target.parent))
            self.copy_file(name, str(target))


setup(
    packages=["wmpo.robot", "wmpo.v1"],
    py_modules=["wmpo.common.tensors"],  # with wmpo/common/__init__.py; nothing else of wmpo.common
    package_dir={"wmpo.robot": "wmpo/robot", "wmpo.common": folder("wmpo.common"), "wmpo.v1": folder("wmpo.v1")},
    package_data={"wmpo.v1": ["*.proto"]},  # the API contract beside its stubs
    cmdclass={"sdist": SdistWithShared},
)
