#!/usr/bin/env python3
"""Runs Nix 2.34.8's own functional test suite (tests/functional/ of Nix's source) with the
Nix 2.34.8 client of a Debian sid root and a chosen daemon behind it:

    tests/nix-functional/run-2.34.py --daemon nix    # sid's nix-daemon 2.34.8 (the baseline)
    tests/nix-functional/run-2.34.py --daemon kiln   # target/release/kiln as the daemon

How it runs
-----------
The 2.34 client and its tools (bash, coreutils, git, jq, busybox, ...) come from the Debian
sid root made by .ci/sid-root.sh (default /var/tmp/sid-root, or $SID_ROOT or $KILN_SID_ROOT;
made if missing). Each test runs in a fresh mount and PID namespace whose root is that tree,
entered with pivot_root rather than chroot: the kernel refuses user namespaces to a chrooted
process (the test scripts' own `unshare --user`, Nix's sandbox, kiln's builds), but not to one
whose root is the root of its mount namespace. So both daemons run inside the same tree as the client,
with every path (store, state, logs, socket) the same for both sides and no bind mount on
the host: everything mounted for a test (the root bound on itself, a /proc for its PID
namespace, /sys, /dev) is private to its namespace and vanishes with it, and so does every
process the test leaves behind (the PID namespace dies with its first process). kiln is a
copy of target/release/kiln (or $KILN_BIN) placed in the work directory (so a rebuild during
a run changes nothing); the libraries it links (glibc, libgcc_s, liblzma) are in the sid root
in newer versions. Running kiln outside the root instead would need its socket, store, state
and log directories bind-mounted into the root at the same paths, and a way for the test
(which starts and restarts the daemon itself, e.g. after editing nix.conf) to start a process
outside; running the client outside through sid's loader breaks whatever Nix re-executes
through /proc/self/exe (the build hook, nix-shell, nix develop).

The suite starts the daemon itself when NIX_DAEMON_PACKAGE is set (common.sh): it runs
`$NIX_DAEMON_PACKAGE/bin/nix daemon` on $NIX_DAEMON_SOCKET_PATH after init.sh has made the
test's store, database and nix.conf, and sets NIX_REMOTE=daemon. For --daemon nix that
`nix` is sid's /usr/bin/nix; for --daemon kiln it is a script that turns `nix ... daemon` into
`kiln --store-dir $NIX_STORE_DIR --state-dir $NIX_STATE_DIR --log-dir $NIX_LOG_DIR
--nix-conf $NIX_CONF_DIR/nix.conf daemon --socket $NIX_DAEMON_SOCKET_PATH` (and
`nix daemon --version` into the Nix version kiln's daemon reports, 2.34.8) and passes every
other command to the client's nix. Tests run unprivileged as the root's user `nixtest`, as
meson runs them: `bash -x -e -u -o pipefail TEST` in the suite's directory with
TEST_SUITE_NAME, TEST_NAME, _NIX_TEST_SOURCE_DIR and _NIX_TEST_BUILD_DIR set. What meson
would generate (common/subst-vars.sh, config.nix, ca/config.nix, dyn-drv/config.nix) is
written into a build directory next to a copy of the sources. Exit 0 is PASS, 77 SKIP, any
other FAIL.

As in upstream's test derivation, the environment has NIX_STORE, stdenv's $shell and $out
(some tests use them), and $busybox (the sandbox shell, which hermetic.nix and build-hook.nix use as
builder) is a static busybox with only ash that runs when called as <hash>-busybox: it is built
from Debian's busybox source with nixpkgs' one-line change (see sandbox_shell()), as Debian's
busybox-static answers "applet not found" there.

The suite should come from Debian's source package of the client (nix 2.34.8+dfsg-1). Where
the package archive no longer serves it (its sid index still lists it, its pool answers 404),
upstream's tag 2.34.8 does the same job: pass --src with that tree or a tarball of it.

    --tests T ...           run these (names as listed: build.sh, ca/build.sh, flakes/run.sh)
    --baseline FILE         compare with the tests that passed with nix-daemon 2.34.8 (only
                            those are run unless --tests is given; exit 1 if one fails that
                            is not in --known-failures)
    --write-baseline FILE   record the tests that passed, and those not passing with the reason
    --logs DIR              where each test's log goes (default target/nix-2.34-logs/DAEMON)
    --src DIR|TARBALL       Nix 2.34.8's source tree, or a tarball of it (default target/
                            nix-2.34-src/nix-2.34.8, fetched with `apt-get source nix` inside the
                            sid root, which gets a deb-src line mirroring its deb line); only
                            tests/functional, scripts/ and .version are used

Needs root (namespaces, pivot_root, apt in the sid root). Nix's files are used in place and
never committed.
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SID = os.environ.get("SID_ROOT") or os.environ.get("KILN_SID_ROOT") or "/var/tmp/sid-root"
VERSION = "2.34.8"
APT = ["apt-get", "-q", "-o", "Acquire::Check-Valid-Until=false"]
# What the suite calls beyond Nix, bash and coreutils (upstream's test derivation has jq, git,
# mercurial, util-linux and a static busybox as the sandbox shell; the rest is its stdenv).
ROOT_PACKAGES = {
    "git": "git", "jq": "jq", "hg": "mercurial", "busybox": "busybox-static", "ps": "procps",
    "ssh-keygen": "openssh-client", "zstd": "zstd", "unzip": "unzip", "zip": "zip",
    "sqlite3": "sqlite3", "python3": "python3", "file": "file", "patch": "patch", "tree": "tree",
    "gawk": "gawk", "xz": "xz-utils", "bzip2": "bzip2", "script": "util-linux",
    "setpriv": "util-linux", "slirp4netns": "slirp4netns",
}
# Suites of tests/functional/meson.build built only with Nix's C++ libraries at hand.
NOT_BUILT = {
    "test-libstoreconsumer.sh": "needs test-libstoreconsumer, a C++ program meson builds "
                                "against libnixstore (not built here)",
    "plugins.sh": "needs libplugintest, a plugin meson builds against libnixexpr (not built here)",
}

# Why tests that fail with nix-daemon 2.34.8 here do (for the baseline's comments).
ENVIRONMENT = {
    "nested-sandboxing.sh": "it runs nix inside a sandbox given only /nix/store and "
        "$(dirname $bindir)=/usr, assuming Nix and its closure live in /nix/store (upstream skips it "
        "without /nix/store; sid's root has an empty one): there Debian's dynamically linked "
        "/usr/bin/bash finds no /lib64/ld-linux-x86-64.so.2 (\"error: executing '/usr/bin/bash': No "
        "such file or directory\")",
}
# More about tests the suite skips here.
SKIP_NOTES = {
    "help.sh": "; past that check it skips anyway: \"we don't know whether we built the manpages, so "
               "we can't reliably test them here\"",
}


def chroot(*cmd, **kw):
    return subprocess.run(["chroot", SID, *cmd], **kw)


def prepare_root():
    """Makes the sid root if missing (.ci/sid-root.sh, a copy of shared/tools/sid-root.sh),
    then adds what the tests need into it: the tools above and the user `nixtest`. Returns
    that user's uid and gid."""
    if not os.access(os.path.join(SID, "usr/bin/nix-daemon"), os.X_OK):
        tools = [os.path.join(ROOT, ".ci", "sid-root.sh"), os.path.join(ROOT, "..", "shared", "tools", "sid-root.sh")]
        tool = next((t for t in tools if os.path.exists(t)), None)
        if tool is None:
            raise SystemExit(f"no Debian sid root at {SID} and no sid-root.sh to make one")
        subprocess.run(["bash", tool], check=True, env=dict(os.environ, SID_ROOT=SID), stdout=subprocess.DEVNULL)
    missing = sorted({pkg for cmd, pkg in ROOT_PACKAGES.items()
                      if not any(os.path.exists(os.path.join(SID, d, cmd)) for d in ["usr/bin", "usr/sbin", "bin"])})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        chroot(*APT, "update", "-qq", env=env, check=True)
        chroot(*APT, "install", "-y", "-qq", "--no-install-recommends", *missing, env=env, check=True,
               stdout=subprocess.DEVNULL)
    if chroot("id", "-u", "nixtest", capture_output=True).returncode != 0:
        chroot("useradd", "--system", "--create-home", "--shell", "/bin/bash", "nixtest", check=True)
    uid = int(chroot("id", "-u", "nixtest", capture_output=True, text=True, check=True).stdout)
    gid = int(chroot("id", "-g", "nixtest", capture_output=True, text=True, check=True).stdout)
    os.makedirs(os.path.join(SID, ".kiln-pivot"), exist_ok=True)
    return uid, gid


def fetch_source():
    dest = os.path.join(ROOT, "target", "nix-2.34-src")
    tree = os.path.join(dest, f"nix-{VERSION}")
    if os.path.isdir(os.path.join(tree, "tests", "functional")):
        return tree
    # Debian's source package, fetched inside the sid root: a deb-src line mirroring its deb
    # line (in sources.list or a deb822 .sources file) when it has none.
    apt_dir = os.path.join(SID, "etc", "apt")
    srcs = [os.path.join(apt_dir, "sources.list")] + glob.glob(os.path.join(apt_dir, "sources.list.d", "*"))
    text = "".join(open(f).read() for f in srcs if os.path.isfile(f))
    if not re.search(r"^deb-src |^Types:.*deb-src", text, re.M):
        lines = re.findall(r"^deb (.*)$", text, re.M)
        for f in glob.glob(os.path.join(apt_dir, "sources.list.d", "*.sources")):
            t = open(f).read()
            if re.search(r"^Types: deb$", t, re.M):
                open(os.path.join(apt_dir, "sources.list.d", "kiln-src-" + os.path.basename(f)), "w").write(
                    re.sub(r"^Types: deb$", "Types: deb-src", t, flags=re.M))
        if lines:
            open(os.path.join(apt_dir, "sources.list.d", "kiln-deb-src.list"), "w").write(
                "".join(f"deb-src {l}\n" for l in lines))
        chroot(*APT, "update", "-qq", check=True)
    if not os.path.exists(os.path.join(SID, "usr/bin/dpkg-source")):
        chroot(*APT, "install", "-y", "-qq", "--no-install-recommends", "dpkg-dev", check=True,
               stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    tmp = tempfile.mkdtemp(prefix="nix-src-", dir=os.path.join(SID, "tmp"))
    try:
        r = chroot("sh", "-c", f"cd /tmp/{os.path.basename(tmp)} && apt-get source -q nix={VERSION}+dfsg-1")
        unpacked = os.path.join(tmp, f"nix-{VERSION}+dfsg")
        if not os.path.isdir(unpacked):
            unpacked = os.path.join(tmp, f"nix-{VERSION}")
        if r.returncode != 0 or not os.path.isdir(os.path.join(unpacked, "tests", "functional")):
            raise SystemExit(
                f"could not fetch Nix {VERSION}'s source with apt-get source inside {SID}; unpack "
                f"nix {VERSION}'s source tree (Debian's, or upstream's tag {VERSION}) as {tree} or "
                "pass --src")
        os.makedirs(dest, exist_ok=True)
        shutil.move(unpacked, tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


BUSYBOX_CONFIG = """STATIC BUSYBOX FEATURE_FANCY_ECHO FEATURE_SH_MATH FEATURE_SH_MATH_64 FEATURE_TEST_64
ASH ASH_OPTIMIZE_FOR_SIZE ASH_ALIAS ASH_BASH_COMPAT ASH_CMDCMD ASH_ECHO ASH_GETOPTS ASH_INTERNAL_GLOB
ASH_JOB_CONTROL ASH_PRINTF ASH_TEST SH_IS_ASH BASH_IS_NONE""".split()


def sandbox_shell():
    """The suite's $busybox, as upstream's test derivation has it (nixpkgs' busybox-sandbox-
    shell): a static busybox with only ash that runs when called as `<hash>-busybox`, which
    is how the builders of hermetic.nix and build-hook.nix run it from the store (nixpkgs
    patches busybox for that; Debian's busybox-static says "applet not found"). Built once
    from Debian's busybox source (apt-get source busybox on the host) with that one-line
    change, into target/nix-2.34-busybox/. Returns None if that cannot be done."""
    out = os.path.join(ROOT, "target", "nix-2.34-busybox", "busybox")
    if os.access(out, os.X_OK):
        return out
    src = os.path.join(ROOT, "target", "busybox-src")
    os.makedirs(src, exist_ok=True)
    trees = [d for d in glob.glob(os.path.join(src, "busybox-*")) if os.path.isdir(d)]
    if not trees:
        subprocess.run(["apt-get", "source", "-q", "busybox"], cwd=src, capture_output=True)
        trees = [d for d in glob.glob(os.path.join(src, "busybox-*")) if os.path.isdir(d)]
    if not trees:
        print("warning: no busybox source (apt-get source busybox needs a deb-src line): the "
              "tests that run $busybox from the store will fail", file=sys.stderr)
        return None
    build = os.path.join(ROOT, "target", "nix-2.34-busybox", "build")
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(trees[0], build, symlinks=True)
    applets = os.path.join(build, "libbb", "appletlib.c")
    text = open(applets).read()
    open(applets, "w").write(text.replace('if (is_prefixed_with(name, "busybox"))',
                                          'if (strstr(name, "busybox") != 0)'))
    log = open(os.path.join(ROOT, "target", "nix-2.34-busybox", "build.log"), "w")
    ok = subprocess.run(["make", "allnoconfig"], cwd=build, stdout=log, stderr=log).returncode == 0
    if ok:
        conf = open(os.path.join(build, ".config")).read()
        for o in BUSYBOX_CONFIG:
            conf = conf.replace(f"# CONFIG_{o} is not set\n", f"CONFIG_{o}=y\n")
        open(os.path.join(build, ".config"), "w").write(conf)
        ok = (subprocess.run("yes '' | make oldconfig", shell=True, cwd=build, stdout=log,
                             stderr=log).returncode == 0
              and subprocess.run(["make", f"-j{os.cpu_count() or 2}"], cwd=build, stdout=log,
                                 stderr=log).returncode == 0)
    if not ok:
        print(f"warning: building busybox failed (see {log.name})", file=sys.stderr)
        return None
    shutil.copy(os.path.join(build, "busybox"), out)
    shutil.rmtree(build, ignore_errors=True)
    return out


def unpack(src):
    """--src: a source tree, or a tarball of one (its top directory nix-2.34.8/ holding at least
    tests/functional, scripts and .version), unpacked into target/nix-2.34-src/."""
    src = os.path.abspath(src)
    if os.path.isdir(src):
        return src
    dest = os.path.join(ROOT, "target", "nix-2.34-src")
    os.makedirs(dest, exist_ok=True)
    top = subprocess.run(["tar", "tf", src], capture_output=True, text=True, check=True).stdout.split("/", 1)[0]
    shutil.rmtree(os.path.join(dest, top), ignore_errors=True)
    subprocess.run(["tar", "xf", src, "-C", dest], check=True)
    return os.path.join(dest, top)


def test_list(src):
    """The tests meson would run: every suite of tests/functional/meson.build and its subdirs,
    as (name relative to tests/functional, suite, directory relative to tests/functional)."""
    fdir = os.path.join(src, "tests", "functional")
    top = open(os.path.join(fdir, "meson.build")).read()
    files = [("", top)] + [(d, open(os.path.join(fdir, d, "meson.build")).read())
                           for d in re.findall(r"^subdir\('([^']+)'\)", top, re.M)
                           if os.path.exists(os.path.join(fdir, d, "meson.build"))]
    out = []
    for d, text in files:
        for suite, body in re.findall(r"'name'\s*:\s*'([^']+)'.*?'tests'\s*:\s*\[(.*?)\]", text, re.S):
            for t in re.findall(r"'([^']+\.sh)'", body):
                out.append((os.path.join(d, t), suite, d))
    return out


def system():
    return chroot("nix", "--extra-experimental-features", "nix-command", "eval", "--raw", "--impure",
                  "--expr", "builtins.currentSystem", capture_output=True, text=True, check=True).stdout.strip()


KILN_WRAPPER = """#!/bin/sh
# kiln standing in for Nix's daemon in Nix's test suite, which runs
# `$NIX_DAEMON_PACKAGE/bin/nix --extra-experimental-features nix-command daemon`: kiln serves the
# test's socket with the test's store, state, log and configuration directories. `daemon
# --version` reports the Nix version kiln's daemon says it is compatible with. Any other
# command is the client's own nix.
for a in "$@"; do
  if [ "$a" = daemon ]; then
    for b in "$@"; do
      if [ "$b" = --version ]; then echo "nix (kiln) {version}"; exit 0; fi
    done
    set -- --store-dir "$NIX_STORE_DIR" --state-dir "$NIX_STATE_DIR" --log-dir "$NIX_LOG_DIR"
    if [ -e "$NIX_CONF_DIR/nix.conf" ]; then set -- "$@" --nix-conf "$NIX_CONF_DIR/nix.conf"; fi
    exec {kiln} "$@" daemon --socket "$NIX_DAEMON_SOCKET_PATH"
  fi
done
exec /usr/bin/nix "$@"
"""


def prepare(src, work, daemon, uid, gid, busybox):
    """The work directory, inside the sid root: a copy of the sources (src/), what meson would
    generate (build/), the daemon package and TMPDIR (tmp/). Returns paths as seen inside."""
    inside = "/" + os.path.relpath(work, SID)
    fsrc = os.path.join(work, "src", "tests", "functional")
    shutil.copytree(os.path.join(src, "tests", "functional"), fsrc, symlinks=True)
    shutil.copytree(os.path.join(src, "scripts"), os.path.join(work, "src", "scripts"), symlinks=True)
    shutil.copy(os.path.join(src, ".version"), os.path.join(work, "src", ".version"))
    version = open(os.path.join(src, ".version")).read().strip()
    if busybox:
        os.makedirs(os.path.join(work, "sandbox-shell"))
        shutil.copy(busybox, os.path.join(work, "sandbox-shell", "busybox"))
    subst = {
        "@bindir@": "/usr/bin",
        "@coreutils@": "/usr/bin",
        "@bash@": "/usr/bin/bash",
        "@dot@": "",  # upstream's test derivation has no graphviz either
        "@sandbox_shell@": f"{inside}/sandbox-shell/busybox" if busybox else "/usr/bin/busybox",
        "@PACKAGE_VERSION@": version,
        "@system@": system(),
    }
    build = os.path.join(work, "build")
    for rel in ["common/subst-vars.sh", "config.nix", "ca/config.nix", "dyn-drv/config.nix"]:
        text = open(os.path.join(fsrc, rel + ".in")).read()
        for k, v in subst.items():
            text = text.replace(k, v)
        os.makedirs(os.path.dirname(os.path.join(build, rel)), exist_ok=True)
        open(os.path.join(build, rel), "w").write(text)
    pkg = os.path.join(work, "daemon-package")
    os.makedirs(os.path.join(pkg, "bin"))
    nix = os.path.join(pkg, "bin", "nix")
    if daemon == "nix":
        os.symlink("/usr/bin/nix", nix)
    else:
        kiln = os.environ.get("KILN_BIN") or os.path.join(ROOT, "target", "release", "kiln")
        if not os.access(kiln, os.X_OK):
            raise SystemExit(f"no {kiln}: cargo build --release -p kiln")
        os.makedirs(os.path.join(pkg, "libexec"))
        shutil.copy(kiln, os.path.join(pkg, "libexec", "kiln"))
        if chroot(os.path.join(inside, "daemon-package", "libexec", "kiln"), "--version",
                  capture_output=True).returncode != 0:
            raise SystemExit(f"{kiln} does not run inside {SID} (missing libraries?)")
        open(nix, "w").write(KILN_WRAPPER.replace("{version}", VERSION)
                             .replace("{kiln}", os.path.join(inside, "daemon-package", "libexec", "kiln")))
        os.chmod(nix, 0o755)
    os.makedirs(os.path.join(work, "tmp"))
    os.chmod(work, 0o755)
    subprocess.run(["chown", "-R", f"{uid}:{gid}", work], check=True)
    return inside


# Run as root on the host inside `unshare --mount --pid --fork`: make the sid root this mount
# namespace's root, then run the test as nixtest. $1 = the root, $2 = uid, $3 = gid,
# $4 = directory, the rest = `env -i` assignments and the command.
ENTER = r"""
set -e
R=$1 uid=$2 gid=$3 dir=$4; shift 4
mount --rbind "$R" "$R"
if mountpoint -q "$R/proc"; then umount -l "$R/proc"; fi
mount -t proc proc "$R/proc"
mountpoint -q "$R/dev" || mount --rbind /dev "$R/dev"
mountpoint -q "$R/sys" || mount -t sysfs sysfs "$R/sys"
cd "$R"
pivot_root . .kiln-pivot
cd /
umount -l /.kiln-pivot
cd "$dir"
exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- env -i "$@"
"""


def run_one(inside, test, timeout, uid, gid):
    name, suite, d = test
    src = f"{inside}/src/tests/functional"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/home/nixtest", "USER": "nixtest", "LOGNAME": "nixtest", "LANG": "C.UTF-8",
        "TMPDIR": f"{inside}/tmp",
        # What the Nix build environment upstream runs the suite in always has: some tests use
        # stdenv's $shell, and structured-attrs.sh expects `nix develop` to pass on the
        # caller's $out (upstream marks that line TODO_NixOS, where $out is unset).
        "NIX_STORE": "/nix/store", "shell": "/usr/bin/bash", "out": f"{inside}/out",
        # What meson sets (tests/functional/meson.build).
        "_NIX_TEST_SOURCE_DIR": src, "_NIX_TEST_BUILD_DIR": f"{inside}/build",
        "TEST_SUITE_NAME": suite, "TEST_NAME": os.path.relpath(name, d)[:-3], "NIX_REMOTE": "",
        "PS4": "+(${BASH_SOURCE[0]-$0}:$LINENO) ",
        "NIX_DAEMON_PACKAGE": f"{inside}/daemon-package",
    }
    cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--",
           "sh", "-c", ENTER, "enter", SID, str(uid), str(gid), os.path.join(src, d),
           *[f"{k}={v}" for k, v in env.items()],
           "bash", "-x", "-e", "-u", "-o", "pipefail", os.path.basename(name)]
    t = time.time()
    # The test's output pipe belongs to the test's user, as under meson: tests reopen it
    # (`tee /dev/stderr`), which the kernel allows only to the pipe's owner.
    r, w = os.pipe()
    os.fchown(w, uid, gid)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=w, stderr=w, start_new_session=True)
    os.close(w)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(os.fdopen(r, "rb").read()), daemon=True)
    reader.start()
    try:
        code = p.wait(timeout=timeout)
        note = ""
    except subprocess.TimeoutExpired:
        # Killing unshare kills the namespace's first process (--kill-child), and with it
        # every process of the test.
        p.kill()
        p.wait()
        code, note = -1, f"\n[run-2.34.py] timed out after {timeout} s\n"
    reader.join(60)
    log = (chunks[0] if chunks else b"").decode(errors="replace") + note
    status = "PASS" if code == 0 else "SKIP" if code == 77 else "FAIL"
    return name, status, time.time() - t, log


def reason(status, log):
    """One line saying why a test did not pass, from its log: the skip message, or where it
    failed (onError's innermost frame), the command there, and the error printed after it."""
    lines = log.splitlines()
    plain = [l for l in lines if not l.startswith("+")]
    if status == "SKIP":
        hits = [l for l in plain if "skipping this test" in l]
        return hits[-1].replace(", skipping this test...", "") if hits else "skipped"
    if "timed out after" in log:
        return [l for l in lines if "timed out after" in l][-1].strip()
    at = [i for i, l in enumerate(lines) if l.endswith("test failed at:")]
    if not at or at[-1] + 1 >= len(lines):
        errs = [l.strip() for l in plain if re.search(r"error:|^test failed|Expected exit code", l)]
        return (errs or plain or ["no output"])[-1][:300]
    end = at[-1]
    loc = lines[end + 1].strip().split(" in ")[-1]
    # The trace lines of that line (a pipeline has several), back to one of another line
    # of the same file.
    file = loc.rsplit(":", 1)[0]
    cmds, cmd_at = [], 0
    for i in range(end - 1, -1, -1):
        m = re.match(r"\+*\(([^)]*):(\d+)\) (.*)", lines[i])
        if not m or m.group(3) == "onError" or not (m.group(1) == file or m.group(1).endswith("/" + file)):
            continue
        if f"{m.group(1)}:{m.group(2)}".endswith(loc):
            cmds.insert(0, m.group(3))
            cmd_at = i
        elif cmds:
            break
    cmd = " | ".join(dict.fromkeys(cmds))
    errs = [l.strip() for l in lines[cmd_at:end]
            if not l.startswith("+") and re.search(r"error:|^test failed|Expected exit code", l)
            and "error (ignored)" not in l]
    out = f"{loc}: {cmd[:160]}"
    return out + (f" -> {errs[-1][:240]}" if errs else "")


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
    p.add_argument("--logs")
    p.add_argument("--verbose", action="store_true", help="print the log of every failing test")
    p.add_argument("--if-source-available", action="store_true",
                   help="when Nix's source cannot be had (Debian's archive has answered 404 for "
                   "nix 2.34.8's source here), say so and exit 0 instead of failing")
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: each test runs in its own mount and PID namespace")
    uid, gid = prepare_root()
    try:
        src = unpack(a.src) if a.src else fetch_source()
    except SystemExit as e:
        if not a.if_source_available:
            raise
        print(f"NOT RUN: Nix {VERSION}'s functional suite: {e}", flush=True)
        return 0
    client = chroot("nix", "--version", capture_output=True, text=True).stdout.strip()
    if not client.endswith(open(os.path.join(src, ".version")).read().strip()):
        print(f"warning: the client is {client!r}, the suite is {src}", file=sys.stderr)
    tests = test_list(src)
    if a.tests:
        by_name = {t[0]: t for t in tests}
        unknown = [n for n in a.tests if n not in by_name]
        if unknown:
            raise SystemExit("not in the suite: " + " ".join(unknown))
        tests = [by_name[n] for n in a.tests]
    elif a.baseline:
        # Only what nix-daemon 2.34.8 passes is expected of kiln.
        base = {l.strip() for l in open(a.baseline) if l.strip() and not l.startswith("#")}
        tests = [t for t in tests if t[0] in base]
    not_built = [t[0] for t in tests if os.path.basename(t[0]) in NOT_BUILT]
    tests = [t for t in tests if os.path.basename(t[0]) not in NOT_BUILT]
    logs = a.logs or os.path.join(ROOT, "target", "nix-2.34-logs", a.daemon)
    os.makedirs(logs, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"n234-{a.daemon}-", dir=os.path.join(SID, "tmp"))
    results, why, secs_of = {}, {}, {}
    start = time.time()
    try:
        inside = prepare(src, work, a.daemon, uid, gid, sandbox_shell())
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
            futs = [ex.submit(run_one, inside, t, a.timeout, uid, gid) for t in tests]
            for f in concurrent.futures.as_completed(futs):
                name, status, secs, log = f.result()
                results[name], secs_of[name] = status, secs
                logf = os.path.join(logs, name.replace("/", "__") + ".log")
                open(logf, "w").write(log)
                if status != "PASS":
                    why[name] = reason(status, log)
                print(f"{status} {name} ({secs:.1f} s)" + (f": {why[name]}" if status != "PASS" else ""),
                      flush=True)
                if status == "FAIL" and a.verbose:
                    shown = log if len(log) <= 8000 else log[:3000] + "\n[...]\n" + log[-5000:]
                    print("    " + shown.replace("\n", "\n    "), flush=True)
    finally:
        if not os.environ.get("KEEP_WORK"):
            subprocess.run(["chmod", "-R", "u+w", work], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    passed = sorted(n for n, s in results.items() if s == "PASS")
    nfail = sum(s == "FAIL" for s in results.values())
    nskip = sum(s == "SKIP" for s in results.values())
    slow = sorted(secs_of.items(), key=lambda kv: -kv[1])[:8]
    print("\nslowest: " + ", ".join(f"{n} {s:.0f} s" for n, s in slow))
    print(f"wall time {time.time() - start:.0f} s with {a.jobs} jobs; logs in {logs}")
    print(f"\n{len(passed)} passed, {nfail} failed, {nskip} skipped (daemon: {a.daemon})")
    if a.write_baseline:
        with open(a.write_baseline, "w") as f:
            f.write(f"# Tests of Nix {VERSION}'s functional suite that pass with nix-daemon {VERSION} here\n"
                    f"# (tests/nix-functional/run-2.34.py --daemon nix --write-baseline FILE), the suite being\n"
                    + ("# Debian's source package.\n#\n" if os.path.isdir(os.path.join(src, "debian")) else
                       f"# upstream's tree at tag {VERSION} (Debian's source package was not to be had).\n#\n"))
            for n in not_built:
                f.write(f"# not run here: {n} — {NOT_BUILT[os.path.basename(n)]}\n")
            for n in sorted(why):
                if n in ENVIRONMENT:
                    w = f"fails with nix-daemon {VERSION} too: {ENVIRONMENT[n]} ({why[n]})"
                elif results[n] == "SKIP" and why[n].startswith("Can't run through the daemon"):
                    w = "the suite skips it when testing a daemon: " + why[n]
                elif results[n] == "SKIP":
                    w = "the suite skips it: " + why[n] + SKIP_NOTES.get(n, "")
                else:
                    w = f"fails with nix-daemon {VERSION}: {why[n]}"
                f.write(f"# not run here: {n} — {w}\n")
            f.write("\n".join(passed) + "\n")
    if a.baseline:
        known = {}
        if a.known_failures:
            for line in open(a.known_failures):
                name, _, w = line.partition("#")
                if name.strip():
                    known[name.strip()] = w.strip()
        names = [t[0] for t in tests]
        for n in names:
            if n in known and results.get(n) != "PASS":
                print(f"known failure: {n}: {known[n]}")
        fixed = [n for n in names if n in known and results.get(n) == "PASS"]
        if fixed:
            print("listed as known failures but now pass (remove them from the list): " + " ".join(fixed))
        failed = [n for n in names if results.get(n) != "PASS" and n not in known]
        if failed:
            print(f"expected to pass (they pass with nix-daemon {VERSION}): " + " ".join(failed))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
