#!/usr/bin/env python3
"""Builds an OCI image archive from files on this machine, without a registry or a daemon.

    python3 scripts/oci-image.py --name FULL/REF:TAG --out PATH.tar \\
        [--bin SRC[:DEST]]...          ELF executable, stripped, with its shared-library
                                       closure (ldd + ELF interpreter) at the same paths;
                                       DEST defaults to /usr/local/bin/<basename>
        [--file SRC:DEST[:MODE]]...    plain file (octal MODE; default 0644, 0755 if the
                                       source is executable)
        [--tree SRC:DEST]...           directory, copied recursively (symlinks kept)
        [--symlink DEST:TARGET]...
        [--entrypoint JSON-ARRAY] [--cmd JSON-ARRAY] [--env K=V]... [--workdir DIR]
        [--user UID:GID] [--label K=V]...

The output is a tar of an OCI image layout (oci-layout, index.json, blobs/sha256/...) with
one gzip layer, and the `manifest.json` of a docker-archive beside it (as `docker save`
writes since Docker 25), loadable by `ctr images import`, `skopeo ... oci-archive:PATH`
(or docker-archive:PATH), `podman load -i` and `docker load -i`. It is deterministic: entries sorted, mtime 0, owner
0:0 (except /home/nonroot), no pax headers, a fixed creation date, so the same inputs give
the same digests. The layer also carries /etc/passwd and /etc/group (root and nonroot
65532), /etc/nsswitch.conf, /tmp (1777), /root and /home/nonroot, unless given explicitly.

Standard library only; uses `ldd` and `strip` (binutils) for --bin.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

CREATED = "1970-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NONROOT = 65532

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# uname -m -> (GOARCH, variant)
ARCHES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}

# A reference: [domain/]path:tag (the tag is required; lowercase repository path).
REF_RE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"
)


class Fail(Exception):
    """An error to report as one clear line, exit 1."""


def log(msg):
    print(f"oci-image: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# The root filesystem as a map: absolute path -> Entry.


class Entry:
    __slots__ = ("kind", "mode", "uid", "gid", "src", "data", "target", "why")

    def __init__(self, kind, mode, src=None, data=None, target=None, uid=0, gid=0, why=""):
        self.kind = kind  # "file", "dir" or "symlink"
        self.mode = mode
        self.src = src  # host path of a file's content
        self.data = data  # or the content itself (bytes)
        self.target = target  # a symlink's target
        self.uid = uid
        self.gid = gid
        self.why = why  # which argument asked for it, for error messages

    def same(self, other):
        if self.kind != other.kind or self.mode != other.mode:
            return False
        if self.kind == "symlink":
            return self.target == other.target
        if self.kind == "dir":
            return True
        if self.data is not None or other.data is not None:
            return self.data == other.data
        return os.path.realpath(self.src) == os.path.realpath(other.src) or files_equal(
            self.src, other.src
        )


def files_equal(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def norm(path, what):
    if not path.startswith("/"):
        raise Fail(f"{what}: {path!r} is not an absolute path")
    p = os.path.normpath(path)
    if p.startswith("//"):
        p = "/" + p.lstrip("/")
    return p


class RootFS:
    def __init__(self):
        self.entries = {}

    def resolve_parents(self, path):
        """The path with every parent that is a symlink in the image followed, so that no
        tar entry goes through a symlink (runtimes refuse or mishandle those)."""
        for _ in range(40):
            parts = path.strip("/").split("/")
            cur = ""
            for i, part in enumerate(parts[:-1]):
                cur = f"{cur}/{part}"
                e = self.entries.get(cur)
                if e is None:
                    continue
                if e.kind == "file":
                    raise Fail(f"{path}: {cur} is a file in the image ({e.why})")
                if e.kind == "symlink":
                    base = os.path.dirname(cur)
                    target = e.target if e.target.startswith("/") else f"{base}/{e.target}"
                    path = norm(os.path.join(target, *parts[i + 1 :]), path)
                    break
            else:
                return path
        raise Fail(f"{path}: too many levels of symbolic links in the image")

    def add(self, path, entry, replace=False):
        path = self.resolve_parents(norm(path, entry.why))
        if path == "/":
            raise Fail(f"{entry.why}: cannot replace /")
        old = self.entries.get(path)
        if old is not None and not replace and not old.same(entry):
            raise Fail(
                f"{path} is given twice, differently: {old.why} ({old.kind}) and "
                f"{entry.why} ({entry.kind})"
            )
        if entry.kind == "symlink":
            prefix = path + "/"
            for other in self.entries:
                if other.startswith(prefix):
                    raise Fail(
                        f"{entry.why}: {path} would be a symlink but the image already has "
                        f"{other} ({self.entries[other].why}) under it"
                    )
        if old is not None and old.kind == "dir" and entry.kind == "dir":
            return path  # keep the first directory's mode
        self.entries[path] = entry
        return path

    def add_host_path(self, path, why, depth=0):
        """A host file at the same absolute path, with every symlink on the way (such as
        Debian's /lib -> usr/lib) reproduced as a symlink in the image."""
        if depth > 40:
            raise Fail(f"{path}: too many levels of symbolic links")
        path = norm(path, why)
        parts = path.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}"
            try:
                st = os.lstat(cur)
            except OSError as err:
                raise Fail(f"{why}: {cur}: {err.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                self.add(cur, Entry("symlink", 0o777, target=target, why=why))
                base = os.path.dirname(cur)
                resolved = target if target.startswith("/") else f"{base}/{target}"
                rest = parts[i + 1 :]
                self.add_host_path(os.path.join(resolved, *rest), why, depth + 1)
                return
            if i < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    raise Fail(f"{why}: {cur} is not a directory")
                self.add(cur, Entry("dir", 0o755, why=why))
            elif stat.S_ISREG(st.st_mode):
                self.add(cur, Entry("file", stat.S_IMODE(st.st_mode), src=cur, why=why))
            else:
                raise Fail(f"{why}: {cur} is not a regular file")

    def finish(self):
        """Every parent directory present (0755 unless given), sorted."""
        for path in list(self.entries):
            parent = os.path.dirname(path)
            while parent != "/" and parent not in self.entries:
                self.entries[parent] = Entry("dir", 0o755, why="parent directory")
                parent = os.path.dirname(parent)
        return sorted(self.entries.items())


# --------------------------------------------------------------------------------------
# ELF executables and their shared-library closure.


def elf_interpreter(path):
    """PT_INTERP of an ELF file, or None for a static executable. Fails on non-ELF."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            raise Fail(f"--bin {path}: not an ELF executable")
        cls, data = ident[4], ident[5]
        end = "<" if data == 1 else ">"
        if cls == 2:
            phoff = int.from_bytes(ident[32:40], "little" if end == "<" else "big")
            phentsize = int.from_bytes(ident[54:56], "little" if end == "<" else "big")
            phnum = int.from_bytes(ident[56:58], "little" if end == "<" else "big")
        else:
            phoff = int.from_bytes(ident[28:32], "little" if end == "<" else "big")
            phentsize = int.from_bytes(ident[42:44], "little" if end == "<" else "big")
            phnum = int.from_bytes(ident[44:46], "little" if end == "<" else "big")
        order = "little" if end == "<" else "big"
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if int.from_bytes(ph[0:4], order) != 3:  # PT_INTERP
                continue
            if cls == 2:
                off, size = int.from_bytes(ph[8:16], order), int.from_bytes(ph[32:40], order)
            else:
                off, size = int.from_bytes(ph[4:8], order), int.from_bytes(ph[16:20], order)
            f.seek(off)
            return f.read(size).rstrip(b"\0").decode()
    return None


LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)?\s*(?:\(0x[0-9a-f]+\))?\s*$")


def shared_libraries(path):
    """Absolute paths of every shared library `ldd` says the executable loads."""
    try:
        out = subprocess.run(
            ["ldd", path], capture_output=True, text=True, check=False, timeout=60
        )
    except FileNotFoundError:
        raise Fail("ldd is missing (Debian: libc-bin)") from None
    if out.returncode != 0:
        raise Fail(f"--bin {path}: ldd failed: {(out.stderr or out.stdout).strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise Fail(f"--bin {path}: a shared library is missing: {line.strip()}")
        if "statically linked" in line or "linux-vdso" in line or "linux-gate" in line:
            continue
        m = LDD_LINE.match(line)
        if m and m.group(2) and m.group(2).startswith("/"):
            libs.append(m.group(2))
    return libs


def stripped_copy(src, tmpdir):
    fd, dst = tempfile.mkstemp(dir=tmpdir, prefix="strip-")
    os.close(fd)
    try:
        out = subprocess.run(
            ["strip", "--strip-unneeded", "-o", dst, src],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    except FileNotFoundError:
        raise Fail("strip is missing (Debian: binutils)") from None
    if out.returncode != 0:
        raise Fail(f"--bin {src}: strip failed: {out.stderr.strip()}")
    return dst


# --------------------------------------------------------------------------------------
# Tar and blobs.


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        self.f.write(b)
        return len(b)


def tarinfo(name, kind, mode, size=0, target="", uid=0, gid=0):
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[
        kind
    ]
    ti.mode = mode
    ti.size = size
    ti.linkname = target
    ti.mtime = 0
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    return ti


def write_layer(entries, tar_out):
    """The layer as an uncompressed tar; returns its sha256 (the diff_id)."""
    w = HashingWriter(tar_out)
    with tarfile.open(fileobj=w, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, e in entries:
            name = path.lstrip("/")
            if e.kind == "file":
                if e.data is not None:
                    ti = tarinfo(name, "file", e.mode, len(e.data), uid=e.uid, gid=e.gid)
                    tar.addfile(ti, io.BytesIO(e.data))
                else:
                    size = os.path.getsize(e.src)
                    ti = tarinfo(name, "file", e.mode, size, uid=e.uid, gid=e.gid)
                    with open(e.src, "rb") as f:
                        tar.addfile(ti, f)
            elif e.kind == "dir":
                tar.addfile(tarinfo(name, "dir", e.mode, uid=e.uid, gid=e.gid))
            else:
                tar.addfile(tarinfo(name, "symlink", 0o777, target=e.target))
    return w.sha.hexdigest()


def gzip_file(src, dst):
    """gzip with no name and mtime 0; returns (sha256, size) of the compressed bytes."""
    with open(dst, "wb") as raw:
        w = HashingWriter(raw)
        with open(src, "rb") as f, gzip.GzipFile(
            filename="", mode="wb", fileobj=w, mtime=0, compresslevel=9
        ) as gz:
            shutil.copyfileobj(f, gz, 1 << 20)
    return w.sha.hexdigest(), w.size


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------
# The command line.


def split_spec(spec, what, n_min, n_max):
    parts = spec.split(":")
    if not n_min <= len(parts) <= n_max or any(p == "" for p in parts):
        raise Fail(f"{what} {spec!r}: expected {what_format(what)}")
    return parts


def what_format(what):
    return {
        "--bin": "SRC[:DEST]",
        "--file": "SRC:DEST[:MODE]",
        "--tree": "SRC:DEST",
        "--symlink": "DEST:TARGET",
    }[what]


def key_value(spec, what):
    if "=" not in spec or spec.startswith("="):
        raise Fail(f"{what} {spec!r}: expected K=V")
    return spec.split("=", 1)


def json_array(text, what):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise Fail(f"{what}: not JSON ({err})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Fail(f"{what}: expected a JSON array of strings, got {text}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="oci-image.py",
        description="Build a deterministic OCI image archive from files on this machine.",
    )
    p.add_argument("--name", required=True, help="full reference with tag, e.g. localhost/app:1.0")
    p.add_argument("--out", required=True, help="the archive to write (a tar of an OCI layout)")
    p.add_argument("--bin", action="append", default=[], metavar="SRC[:DEST]")
    p.add_argument("--file", action="append", default=[], metavar="SRC:DEST[:MODE]")
    p.add_argument("--tree", action="append", default=[], metavar="SRC:DEST")
    p.add_argument("--symlink", action="append", default=[], metavar="DEST:TARGET")
    p.add_argument("--entrypoint", metavar="JSON-ARRAY")
    p.add_argument("--cmd", metavar="JSON-ARRAY")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--user", metavar="UID:GID")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    return p.parse_args(argv)


def build_rootfs(args, tmpdir):
    fs = RootFS()

    # Host paths of the shared-library closures first: they bring the host's symlinks
    # (/lib -> usr/lib), which everything added later is placed through.
    bins = []
    for spec in args.bin:
        parts = split_spec(spec, "--bin", 1, 2)
        src = parts[0]
        if not os.path.isfile(src):
            raise Fail(f"--bin {src}: no such file")
        if not os.access(src, os.X_OK):
            raise Fail(f"--bin {src}: not executable")
        dest = parts[1] if len(parts) == 2 else f"/usr/local/bin/{os.path.basename(src)}"
        interp = elf_interpreter(src)
        if interp:
            fs.add_host_path(interp, f"--bin {src} (interpreter)")
            for lib in shared_libraries(src):
                fs.add_host_path(lib, f"--bin {src} (needs {lib})")
        bins.append((src, dest))
    for src, dest in bins:
        fs.add(dest, Entry("file", 0o755, src=stripped_copy(src, tmpdir), why=f"--bin {src}"))

    for spec in args.tree:
        src, dest = split_spec(spec, "--tree", 2, 2)
        if not os.path.isdir(src):
            raise Fail(f"--tree {src}: not a directory")
        why = f"--tree {src}"
        dest = norm(dest, why)
        fs.add(dest, Entry("dir", stat.S_IMODE(os.stat(src).st_mode), why=why))
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                host = os.path.join(dirpath, name)
                inside = os.path.join(dest, os.path.relpath(host, src))
                st = os.lstat(host)
                if stat.S_ISLNK(st.st_mode):
                    fs.add(inside, Entry("symlink", 0o777, target=os.readlink(host), why=why))
                elif stat.S_ISDIR(st.st_mode):
                    fs.add(inside, Entry("dir", stat.S_IMODE(st.st_mode), why=why))
                elif stat.S_ISREG(st.st_mode):
                    fs.add(inside, Entry("file", stat.S_IMODE(st.st_mode), src=host, why=why))
                else:
                    raise Fail(f"{why}: {host} is neither a file, a directory nor a symlink")
            # os.walk does not descend into symlinked directories: they stay symlinks.

    for spec in args.file:
        parts = split_spec(spec, "--file", 2, 3)
        src, dest = parts[0], parts[1]
        if not os.path.isfile(src):
            raise Fail(f"--file {src}: no such file")
        if len(parts) == 3:
            try:
                mode = int(parts[2], 8)
            except ValueError:
                raise Fail(f"--file {spec}: MODE {parts[2]!r} is not octal") from None
            if not 0 <= mode <= 0o7777:
                raise Fail(f"--file {spec}: MODE {parts[2]!r} out of range")
        else:
            mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        fs.add(dest, Entry("file", mode, src=src, why=f"--file {src}"))

    for spec in args.symlink:
        dest, _, target = spec.partition(":")
        if not dest or not target:
            raise Fail(f"--symlink {spec!r}: expected DEST:TARGET")
        fs.add(dest, Entry("symlink", 0o777, target=target, why=f"--symlink {spec}"))

    # What a minimal image needs to resolve users and names, unless given.
    defaults = [
        ("/etc/passwd", Entry("file", 0o644, data=(
            "root:x:0:0:root:/root:/sbin/nologin\n"
            f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
        ).encode(), why="default /etc/passwd")),
        ("/etc/group", Entry("file", 0o644, data=(
            f"root:x:0:\nnonroot:x:{NONROOT}:\n"
        ).encode(), why="default /etc/group")),
        ("/etc/nsswitch.conf", Entry("file", 0o644, data=(
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
            "networks: files\nprotocols: files\nservices: files\n"
        ).encode(), why="default /etc/nsswitch.conf")),
        ("/tmp", Entry("dir", 0o1777, why="default /tmp")),
        ("/root", Entry("dir", 0o700, why="default /root")),
        ("/home/nonroot", Entry("dir", 0o755, uid=NONROOT, gid=NONROOT, why="default home")),
    ]
    for path, entry in defaults:
        if fs.resolve_parents(path) not in fs.entries:
            fs.add(path, entry)
    return fs.finish()


def image_config(args, arch, variant, diff_id):
    env, seen = [], set()
    for spec in args.env:
        k, v = key_value(spec, "--env")
        if k in seen:
            env = [e for e in env if not e.startswith(k + "=")]
        seen.add(k)
        env.append(f"{k}={v}")
    if "PATH" not in seen:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    config = {"Env": env}
    if args.entrypoint is not None:
        config["Entrypoint"] = json_array(args.entrypoint, "--entrypoint")
    if args.cmd is not None:
        config["Cmd"] = json_array(args.cmd, "--cmd")
    if args.workdir:
        config["WorkingDir"] = norm(args.workdir, "--workdir")
    if args.user:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", args.user):
            raise Fail(f"--user {args.user!r}: expected UID[:GID]")
        config["User"] = args.user
    if args.label:
        config["Labels"] = dict(key_value(spec, "--label") for spec in args.label)
    doc = {
        "created": CREATED,
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": CREATED, "created_by": "scripts/oci-image.py"}],
    }
    if variant:
        doc["variant"] = variant
    return doc


def build(args):
    m = REF_RE.match(args.name)
    if not m:
        raise Fail(
            f"--name {args.name!r}: expected a full reference with a tag, such as "
            "localhost/app:1.0 (lowercase repository, tag of [A-Za-z0-9_.-])"
        )
    tag = m.group("tag")
    machine = platform.machine()
    if machine not in ARCHES:
        raise Fail(f"unknown machine architecture {machine!r}")
    arch, variant = ARCHES[machine]

    out = os.path.abspath(args.out)
    out_dir = os.path.dirname(out)
    os.makedirs(out_dir, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="oci-image-") as tmp:
        entries = build_rootfs(args, tmp)
        blobs = os.path.join(tmp, "blobs")
        os.makedirs(blobs)

        layer_tar = os.path.join(tmp, "layer.tar")
        with open(layer_tar, "wb") as f:
            diff_id = write_layer(entries, f)
        layer_gz = os.path.join(tmp, "layer.tar.gz")
        layer_digest, layer_size = gzip_file(layer_tar, layer_gz)
        os.unlink(layer_tar)
        os.replace(layer_gz, os.path.join(blobs, layer_digest))

        def blob(data):
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, digest), "wb") as f:
                f.write(data)
            return digest, len(data)

        config_digest, config_size = blob(
            canonical_json(image_config(args, arch, variant, diff_id))
        )
        manifest_digest, manifest_size = blob(canonical_json({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {
                "mediaType": MT_CONFIG,
                "digest": f"sha256:{config_digest}",
                "size": config_size,
            },
            "layers": [{
                "mediaType": MT_LAYER,
                "digest": f"sha256:{layer_digest}",
                "size": layer_size,
            }],
        }))
        platform_desc = {"architecture": arch, "os": "linux"}
        if variant:
            platform_desc["variant"] = variant
        index = canonical_json({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": f"sha256:{manifest_digest}",
                "size": manifest_size,
                "platform": platform_desc,
                "annotations": {
                    "io.containerd.image.name": args.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        })
        layout = canonical_json({"imageLayoutVersion": "1.0.0"})
        # What `docker save` writes beside the OCI layout since Docker 25: docker load
        # before 25 (Debian 12 ships 20.10) reads only this. The OCI readers ignore it.
        docker_manifest = canonical_json([{
            "Config": f"blobs/sha256/{config_digest}",
            "RepoTags": [args.name],
            "Layers": [f"blobs/sha256/{layer_digest}"],
        }])

        fd, partial = tempfile.mkstemp(dir=out_dir, prefix=".oci-image-", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(
                fileobj=f, mode="w", format=tarfile.GNU_FORMAT
            ) as tar:
                tar.addfile(tarinfo("oci-layout", "file", 0o644, len(layout)), io.BytesIO(layout))
                tar.addfile(tarinfo("index.json", "file", 0o644, len(index)), io.BytesIO(index))
                tar.addfile(
                    tarinfo("manifest.json", "file", 0o644, len(docker_manifest)),
                    io.BytesIO(docker_manifest),
                )
                tar.addfile(tarinfo("blobs/", "dir", 0o755))
                tar.addfile(tarinfo("blobs/sha256/", "dir", 0o755))
                for digest in sorted(os.listdir(blobs)):
                    path = os.path.join(blobs, digest)
                    ti = tarinfo(f"blobs/sha256/{digest}", "file", 0o644, os.path.getsize(path))
                    with open(path, "rb") as b:
                        tar.addfile(ti, b)
            os.chmod(partial, 0o644)
            os.replace(partial, out)
        except BaseException:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            raise

    log(f"{args.name} -> {out}")
    log(
        f"{len(entries)} entries; layer sha256:{layer_digest}, "
        f"{layer_size / (1 << 20):.1f} MiB compressed ({layer_size} bytes); "
        f"archive {os.path.getsize(out) / (1 << 20):.1f} MiB; manifest sha256:{manifest_digest}"
    )


def main(argv):
    args = parse_args(argv)
    try:
        build(args)
    except Fail as err:
        log(f"error: {err}")
        return 1
    except OSError as err:
        log(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
