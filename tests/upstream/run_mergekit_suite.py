#!/usr/bin/env python3
"""Run mergekit 0.1.5's own test-suite against the installed mergekit.

With mergekit-partition-slerp installed, mergekit's registry also holds
``partition_slerp``, so upstream tests parametrised over every registered
method exercise it too. This script:

1. fetches the mergekit 0.1.5 sdist with ``pip download`` into a cache
   directory (once; its sha256 is checked), and extracts only its ``tests/``;
2. adds ``tests/common.py`` (missing from the sdist) from ``common.py`` next
   to this script, and a ``pytest.ini`` with upstream's pytest settings;
3. runs pytest from inside the extracted ``tests/`` (rootdir = that directory)
   with the hub switched off, checks that ``import mergekit`` resolves to the
   installed package rather than to anything extracted, and reports the counts;
4. confirms that
   ``test_merge_method_regressions.py::test_state_dict_methods_accept_strided_weights_without_mutation[partition_slerp]``
   ran and passed.

The exit code is pytest's; if pytest succeeded but the partition_slerp case
did not run and pass, it is 1.

Usage:
    python tests/upstream/run_mergekit_suite.py [--cache DIR] [-k EXPR] [-- PYTEST_ARGS...]

Stdlib only; needs pip and pytest in the running interpreter's environment.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
SDIST_NAME = f"mergekit-{MERGEKIT_VERSION}.tar.gz"
SDIST_SHA256 = "caa51dbbfa493bcd62218d17f2bc7bb1c7a2a2e4baf4e2f34a29d73c66c594aa"

REQUIRED_FILE = "test_merge_method_regressions.py"
REQUIRED_FUNC = "test_state_dict_methods_accept_strided_weights_without_mutation"
REQUIRED_PARAM = "partition_slerp"
REQUIRED_NODEID = f"{REQUIRED_FILE}::{REQUIRED_FUNC}[{REQUIRED_PARAM}]"
# Always added to a user's -k expression so the required case is never deselected.
REQUIRED_K = f"({REQUIRED_FUNC} and {REQUIRED_PARAM})"

HERE = Path(__file__).resolve().parent
COMMON_PY = HERE / "common.py"

# Upstream's [tool.pytest.ini_options] from the sdist's pyproject.toml, minus
# testpaths (we pass the directory explicitly). Written as tests/pytest.ini so
# no pytest configuration of an enclosing directory can leak in.
PYTEST_INI = """\
[pytest]
minversion = 6.0
filterwarnings =
    ignore::pydantic.PydanticDeprecatedSince20:huggingface_hub.*:
    ignore::FutureWarning:huggingface_hub.*:
    ignore:Attempting Automatic Merge:UserWarning
    ignore:No architecture config available:UserWarning
"""

# Tests deselected because they cannot work offline, as "nodeid": "reason".
# (None of mergekit 0.1.5's tests needs the hub once tests/common.py builds
# its models locally; kept as the one place to add such cases.)
DESELECT = {}


def log(msg: str) -> None:
    print(f"[upstream-suite] {msg}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / SDIST_NAME
    if sdist.exists() and sha256(sdist) == SDIST_SHA256:
        log(f"using cached sdist {sdist}")
        return sdist
    sdist_dir.mkdir(parents=True, exist_ok=True)
    if sdist.exists():
        log(f"cached {sdist} has the wrong sha256; fetching it again")
        sdist.unlink()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary", ":all:", f"mergekit=={MERGEKIT_VERSION}",
        "-d", str(sdist_dir),
    ]  # fmt: skip
    log("fetching sdist: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    if not sdist.exists():
        sys.exit(f"pip download did not produce {sdist}")
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def extract_tests(sdist: Path, work: Path) -> Path:
    """Extract only <sdist>/tests/ into work/tests (afresh each run)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    prefix = f"mergekit-{MERGEKIT_VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or not member.isfile():
                continue
            member.name = "tests/" + member.name[len(prefix) :]
            members.append(member)
        if not members:
            sys.exit(f"{sdist} has no {prefix} directory")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(work, members=members, **kwargs)
    tests = work / "tests"
    if (tests / "common.py").exists():
        log("note: the sdist now ships tests/common.py; replacing it with ours")
    shutil.copyfile(COMMON_PY, tests / "common.py")
    (tests / "pytest.ini").write_text(PYTEST_INI)
    return tests


def pytest_env(work: Path) -> dict:
    env = dict(os.environ)
    # Nothing may come from the hub.
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        # An empty HF home: a model cached by earlier use cannot mask a test
        # that would need the network.
        HF_HOME=str(work / "hf_home"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    # The tests import `tests.common` / `tests.test_tokenizer`, so the parent
    # of tests/ must be importable. It holds nothing but tests/ (never the
    # sdist's mergekit/), so `import mergekit` still finds the installed one.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(work), env.get("PYTHONPATH", "")] if p)
    return env


def check_mergekit_import(tests: Path, env: dict, work: Path) -> None:
    probe = (
        "import mergekit, mergekit.merge_methods as m\n"
        "print(mergekit.__file__)\n"
        f"print({REQUIRED_PARAM!r} in [x.spec.name for x in m.registered_methods()])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tests, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"cannot import mergekit in the test environment:\n{out.stderr}")
    location, registered = out.stdout.split()[-2:]
    log(f"mergekit under test: {location}")
    if Path(location).resolve().is_relative_to(work.resolve()):
        sys.exit("`import mergekit` resolves into the extracted sdist, not the install")
    if registered != "True":
        sys.exit(f"{REQUIRED_PARAM} is not in mergekit's merge-method registry")


def parse_junit(path: Path) -> dict:
    """nodeid -> outcome (passed/failed/error/skipped) from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        # classname is "<module>[.<Class>]" relative to rootdir, dotted.
        parts = classname.split(".")
        module, classes = parts[0], parts[1:]
        nodeid = "::".join([module + ".py", *classes, case.get("name", "")])
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                break
        # a setup error after a call failure etc. records twice: keep worst
        if outcomes.get(nodeid) in ("failed", "error"):
            continue
        outcomes[nodeid] = outcome
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run mergekit 0.1.5's test-suite against the installed mergekit (with partition_slerp registered).",
    )
    parser.add_argument(
        "--cache",
        default="~/.cache/mergekit-partition-slerp/upstream",
        help="where the sdist is kept and its tests are extracted (default: %(default)s)",
    )
    parser.add_argument(
        "-k",
        dest="keyword",
        metavar="EXPR",
        help="pytest -k expression; the partition_slerp case is always kept",
    )
    parser.add_argument(
        "pytest_args",
        nargs="*",
        help="extra pytest arguments, after `--`",
    )
    args = parser.parse_args(argv)

    if not COMMON_PY.exists():
        sys.exit(f"missing {COMMON_PY}")
    cache = Path(args.cache).expanduser().resolve()
    work = cache / "work"
    sdist = fetch_sdist(cache)
    tests = extract_tests(sdist, work)
    env = pytest_env(work)
    check_mergekit_import(tests, env, work)

    junit = work / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", ".",
        "-p", "no:cacheprovider", "-q", "-rfEs",
        "-c", "pytest.ini", "--rootdir", ".",
        f"--junitxml={junit}", "-o", "junit_family=xunit2",
    ]  # fmt: skip
    for nodeid, reason in DESELECT.items():
        log(f"deselecting {nodeid}: {reason}")
        cmd += ["--deselect", nodeid]
    if args.keyword:
        expr = f"({args.keyword}) or {REQUIRED_K}"
        log(f"-k {expr}")
        cmd += ["-k", expr]
    cmd += args.pytest_args
    log(f"running in {tests}: " + " ".join(cmd[1:]))

    start = time.monotonic()
    code = subprocess.run(cmd, cwd=tests, env=env).returncode
    elapsed = time.monotonic() - start

    if not junit.exists():
        log(f"pytest wrote no report (exit code {code})")
        return code or 1
    outcomes = parse_junit(junit)
    counts = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(
        f"{counts.get(k, 0)} {k}"
        for k in ("passed", "failed", "error", "skipped", "xfailed")
        if counts.get(k) or k in ("passed", "failed", "skipped")
    )
    log(f"pytest exit code {code}; {summary}; {elapsed:.1f} s wall")
    for nodeid, outcome in sorted(outcomes.items()):
        if outcome in ("failed", "error"):
            log(f"  {outcome.upper()}: {nodeid}")

    required = outcomes.get(REQUIRED_NODEID)
    if required == "passed":
        log(f"OK: {REQUIRED_NODEID} ran and passed")
    else:
        state = "was not collected" if required is None else f"outcome: {required}"
        log(f"FAIL: {REQUIRED_NODEID} {state}")
        if code == 0:
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
