"""transformers' own common model tests (`ModelTesterMixin`) on a tiny SERA, as an in-tree model is tested.

The mixin is not in the transformers wheel: it ships in the sdist of the pinned version, as
`tests/test_modeling_common.py`. The setup fetches that sdist with pip (cached, so later runs reuse it), unpacks its
`tests/` into a temporary folder, puts SERA's tester (tests/helpers/sera_model_tester.py) next to it and runs pytest there in a
separate process. No transformers test code is copied into this repository.

The sdist's `tests/` lacks two sub-packages the mixin imports: `exporters/` (the torch.export tests, a base class of
the mixin) and `generation/` (for `generate`, which SERA does not have). Empty stand-ins take their place, so the
export tests do not run here. `parameterized`, which the mixin needs, is installed next to the sdist with pip.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
import transformers

from tests.helpers import REPO_ROOT


CACHE = Path(
    os.environ.get("SERA_TEST_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sera-tests")
)
SDIST_NAME = f"transformers-{transformers.__version__}"
PARAMETERIZED = "parameterized==0.9.0"
STAND_INS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:  # stand-in: the sdist does not ship tests/exporters/\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:  # stand-in: the sdist does not ship tests/generation/\n"
    "    pass\n",
}
# Mixin tests that SERA fails today, each with its cause; each must fail (an unexpected pass fails this test too, so
# an entry is removed once fixed). Empty: every applicable test passes.
KNOWN_FAILURES: dict[str, str] = {}


def pip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *arguments, "--quiet", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def fetch_sdist() -> Path:
    """The transformers sdist of the installed version, downloaded once into the cache."""
    archive = CACHE / f"{SDIST_NAME}.tar.gz"
    if not archive.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        spec = f"transformers=={transformers.__version__}"
        result = pip("download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(CACHE))
        if not archive.is_file():
            pytest.skip(
                f"cannot fetch the {spec} sdist that holds ModelTesterMixin (offline?): {result.stderr[-300:]}"
            )
    return archive


def fetch_parameterized() -> Path:
    target = CACHE / "deps"
    if not (target / "parameterized").is_dir():
        result = pip("install", "--no-deps", "--target", str(target), PARAMETERIZED)
        if result.returncode:
            shutil.rmtree(target, ignore_errors=True)
            pytest.skip(
                f"cannot install {PARAMETERIZED}, which ModelTesterMixin imports (offline?): {result.stderr[-300:]}"
            )
    return target


@pytest.fixture(scope="module")
def mixin_tree(tmp_path_factory) -> Path:
    """An unpacked `tests/` of the transformers sdist, with the stand-ins and SERA's tester in it."""
    archive = fetch_sdist()
    root = tmp_path_factory.mktemp("transformers-sdist")
    prefix = f"{SDIST_NAME}/tests/"
    with tarfile.open(archive) as sdist:
        members = [member for member in sdist.getmembers() if member.name.startswith(prefix) and member.isfile()]
        sdist.extractall(root, members=members, filter="data")
    tests = root / SDIST_NAME / "tests"
    assert (tests / "test_modeling_common.py").is_file(), f"{archive.name} has no tests/test_modeling_common.py"
    for name, text in STAND_INS.items():
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
        if not (tests / name).exists():
            (tests / name).write_text(text)
    shutil.copy(REPO_ROOT / "tests" / "helpers" / "sera_model_tester.py", tests / "test_sera_common.py")
    return root / SDIST_NAME


def test_sera_passes_transformers_model_tester_mixin(mixin_tree, tmp_path):
    deps = fetch_parameterized()
    report = tmp_path / "junit.xml"
    helpers = REPO_ROOT / "tests" / "helpers"
    env = dict(os.environ, PYTHONPATH=str(deps), SERA_TESTS_DIR=str(helpers), HF_HUB_OFFLINE="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_sera_common.py",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-o",
            "addopts=",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            "-q",
            "-rs",
            f"--junitxml={report}",
        ],
        cwd=mixin_tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    passed, failed, skipped = [], {}, {}
    for case in cases:
        name = case.get("name")
        problems = [child for child in case if child.tag in ("failure", "error")]
        skips = [child for child in case if child.tag == "skipped"]
        if problems:
            failed[name] = problems[0].get("message", "")[:300]
        elif skips:
            skipped[name] = skips[0].get("message", "")
        else:
            passed.append(name)
    print(f"ModelTesterMixin on SERA: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    for name, reason in sorted(skipped.items()):
        print(f"  skipped {name}: {reason}")

    unexpected = {name: message for name, message in failed.items() if name not in KNOWN_FAILURES}
    assert not unexpected, unexpected
    fixed = [name for name in KNOWN_FAILURES if name not in failed]
    assert not fixed, f"now passing, remove from KNOWN_FAILURES: {fixed}"
    assert len(passed) >= 70, result.stdout[-3000:]  # the mixin really ran (79 tests apply to SERA today)
    # Every skip is the mixin's own verdict (its requirement decorators or a skipTest in test_modeling_common.py),
    # each with its reason; SERA's tester skips nothing itself.
    skip_lines = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skip_lines and all("test_modeling_common.py:" in line for line in skip_lines), skip_lines
    assert all(reason.strip() for reason in skipped.values()), skipped
