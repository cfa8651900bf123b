#!/usr/bin/env python3
"""Runs Nix 2.8.0's own functional test suite (tests/*.sh from Debian's source package) with
the Debian 2.8 binaries as clients and a chosen daemon behind them:

    tests/nix-functional/run.py --daemon nix    # Nix 2.8's own nix-daemon (the baseline)
    tests/nix-functional/run.py --daemon kiln   # kiln, wrapped as $NIX_DAEMON_PACKAGE/bin/nix-daemon

The suite starts the daemon itself when NIX_DAEMON_PACKAGE is set (tests/common.sh): every
test then talks to it over $NIX_DAEMON_SOCKET_PATH, unprivileged, with the test's own
NIX_STORE_DIR/NIX_STATE_DIR/NIX_LOG_DIR/NIX_CONF_DIR. This script fills in what `configure`
would substitute, runs each test as `make installcheck` does, and reports PASS/FAIL/SKIP.

    --baseline FILE         compare with the tests that passed with Nix 2.8's daemon
                            (exit 1 if any of them fails here)
    --write-baseline FILE   record the tests that passed
    --src DIR               an unpacked nix-2.8.0 source tree (default: fetched with
                            `apt-get source nix` into target/nix-2.8.0-src, which needs a
                            deb-src line)

Nix's files are used in place and never committed.
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fetch_source():
    dest = os.path.join(ROOT, "target", "nix-2.8.0-src")
    tree = os.path.join(dest, "nix-2.8.0")
    if os.path.isdir(os.path.join(tree, "tests")):
        return tree
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["apt-get", "source", "-q", "nix"], cwd=dest)
    if not os.path.isdir(os.path.join(tree, "tests")):
        raise SystemExit("could not fetch Nix 2.8.0's source (apt-get source nix needs a deb-src line)")
    return tree


def test_list(src):
    text = open(os.path.join(src, "tests", "local.mk")).read()
    block = text.split("nix_tests = \\", 1)[1].split("\n\n", 1)[0]
    return [t.strip(" \\") for t in block.splitlines() if t.strip(" \\")]


def system():
    return subprocess.run(["nix", "--extra-experimental-features", "nix-command", "eval", "--raw", "--impure",
                           "--expr", "builtins.currentSystem"], capture_output=True, text=True, check=True).stdout.strip()


def prepare(src, work, daemon):
    tests = os.path.join(work, "tests")
    shutil.copytree(os.path.join(src, "tests"), tests, symlinks=True)
    subst = {
        "@bindir@": "/usr/bin",
        "@coreutils@": "/usr/bin",
        "@bash@": "/bin/bash",
        "@system@": system(),
        "@PACKAGE_VERSION@": "2.8.0",
        "@dot@": "",
        "@sandbox_shell@": "",
    }
    for rel in ["common.sh", "config.nix", "ca/config.nix"]:
        text = open(os.path.join(tests, rel + ".in")).read()
        for k, v in subst.items():
            text = text.replace(k, v)
        open(os.path.join(tests, rel), "w").write(text)
    pkg = os.path.join(work, "daemon-package", "bin")
    os.makedirs(pkg)
    wrapper = os.path.join(pkg, "nix-daemon")
    if daemon == "nix":
        os.symlink(shutil.which("nix-daemon"), wrapper)
    else:
        kiln = os.environ.get("KILN_BIN") or os.path.join(ROOT, "target", "release", "kiln")
        open(wrapper, "w").write(f"""#!/bin/sh
# kiln standing in for nix-daemon in Nix's test suite: it serves the test's socket
# with the test's store, state, log and configuration directories.
# The version kiln reports to clients (`nix store info`): the Nix whose protocol it speaks.
if [ "$1" = --version ]; then echo "nix-daemon (kiln) 2.34.8"; exit 0; fi
# Like nix-daemon, a missing nix.conf means defaults (init.sh starts the daemon before
# writing it).
set -- --store-dir "$NIX_STORE_DIR" --state-dir "$NIX_STATE_DIR" --log-dir "$NIX_LOG_DIR"
if [ -e "$NIX_CONF_DIR/nix.conf" ]; then set -- "$@" --nix-conf "$NIX_CONF_DIR/nix.conf"; fi
exec {kiln} "$@" daemon --socket "$NIX_DAEMON_SOCKET_PATH"
""")
        os.chmod(wrapper, 0o755)
    return tests, os.path.dirname(pkg)


def test_user():
    """The suite runs unprivileged (as its tests assume: `[ -w $outPath ]` is always true
    for root). When run as root, tests run as the user `nixtest`, created if missing."""
    if os.geteuid() != 0:
        return None
    import pwd
    try:
        return pwd.getpwnam("nixtest")
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/bash", "nixtest"], check=True)
        return pwd.getpwnam("nixtest")


def run_one(tests, pkg, name, timeout, tmp, user):
    env = dict(os.environ)
    for k in ["NIX_REMOTE", "NIX_PATH", "NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_CONF_DIR"]:
        env.pop(k, None)
    env.update(TEST_NAME="tests/" + name[:-3], NIX_DAEMON_PACKAGE=pkg, NIX_REMOTE="", TMPDIR=tmp)
    t = time.time()
    try:
        ids = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        if user is not None:
            env.update(USER=user.pw_name, LOGNAME=user.pw_name)
        # init.sh wipes and recreates the test's store and database; it runs without a
        # daemon (common.sh would start one first, whose store init.sh then deletes: Nix's
        # daemon forks a process per client that reopens the store, kiln opens it once).
        init_env = {k: v for k, v in env.items() if k != "NIX_DAEMON_PACKAGE"}
        init = subprocess.run(["bash", "-e", "init.sh"], cwd=tests, env=init_env, capture_output=True,
                              timeout=timeout, **ids)
        if init.returncode != 0:
            return name, "FAIL", time.time() - t, "init.sh failed:\n" + (init.stdout + init.stderr).decode(errors="replace")
        d = os.path.join(tests, os.path.dirname(name))
        r = subprocess.run(["bash", "-e", os.path.basename(name)], cwd=d, env=env, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, **ids)
        code, log = r.returncode, (r.stdout + r.stderr).decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        code, log = -1, f"timed out after {timeout} s\n" + ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")
    finally:
        # Stop a daemon the test left behind.
        subprocess.run(["pkill", "-f", f"{tmp}/nix-test/tests/{name[:-3]}/dSocket"], capture_output=True)
    status = "PASS" if code == 0 else "SKIP" if code == 99 else "FAIL"
    return name, status, time.time() - t, log


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", choices=["nix", "kiln"], required=True)
    p.add_argument("--src")
    p.add_argument("--tests", nargs="*")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--baseline")
    p.add_argument("--write-baseline")
    p.add_argument("--known-failures", help="tests of the baseline kiln does not pass yet, one per line "
                   "with the reason after '#': reported, not fatal")
    p.add_argument("--verbose", action="store_true", help="print the log of every failing test")
    a = p.parse_args()
    src = a.src or fetch_source()
    names = a.tests or test_list(src)
    if a.baseline and not a.tests:
        # Only what Nix 2.8's own daemon passes is expected of kiln.
        base = [l.strip() for l in open(a.baseline) if l.strip() and not l.startswith("#")]
        names = [n for n in names if n in base]
    work = tempfile.mkdtemp(prefix=f"nix-functional-{a.daemon}-")
    tests, pkg = prepare(src, work, a.daemon)
    tmp = os.path.join(work, "tmp")
    # init.sh makes only the last component of each test's root.
    os.makedirs(os.path.join(tmp, "nix-test", "tests"))
    user = test_user()
    if user is not None:
        os.chmod(work, 0o755)
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", work], check=True)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        futs = [ex.submit(run_one, tests, pkg, n, a.timeout, tmp, user) for n in names]
        for f in concurrent.futures.as_completed(futs):
            name, status, secs, log = f.result()
            results[name] = status
            print(f"{status} {name} ({secs:.1f} s)", flush=True)
            if status == "FAIL" and a.verbose:
                # The start (the daemon's own errors) and the end (the failing command).
                shown = log if len(log) <= 8000 else log[:3000] + "\n[...]\n" + log[-5000:]
                print("    " + shown.replace("\n", "\n    "), flush=True)
    passed = sorted(n for n, s in results.items() if s == "PASS")
    print(f"\n{len(passed)} passed, {sum(s == 'FAIL' for s in results.values())} failed, "
          f"{sum(s == 'SKIP' for s in results.values())} skipped (daemon: {a.daemon})")
    if a.write_baseline:
        with open(a.write_baseline, "w") as f:
            f.write(f"# Tests of Nix 2.8.0's functional suite that pass with Nix 2.8's own daemon on this\n"
                    f"# machine (tests/nix-functional/run.py --daemon nix --write-baseline).\n")
            f.write("\n".join(passed) + "\n")
    if not os.environ.get("KEEP_WORK"): shutil.rmtree(work, ignore_errors=True)
    if a.baseline:
        known = {}
        if a.known_failures:
            for line in open(a.known_failures):
                name, _, why = line.partition("#")
                if name.strip():
                    known[name.strip()] = why.strip()
        failed = [n for n in names if results.get(n) != "PASS" and n not in known]
        for n in names:
            if n in known and results.get(n) != "PASS":
                print(f"known failure: {n}: {known[n]}")
        fixed = [n for n in names if n in known and results.get(n) == "PASS"]
        if fixed:
            print("listed as known failures but now pass (remove them from the list): " + " ".join(fixed))
        if failed:
            print("expected to pass (they pass with Nix 2.8's daemon): " + " ".join(failed))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
