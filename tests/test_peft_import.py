"""Adapters from other tools: directories written by Hugging Face PEFT itself, evaluated and
trained further in qpeft (``qpeft eval ADAPTER_DIR``, ``qpeft run --init-adapter DIR``)."""
import copy
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.model import models, streaming
from qpeft.core.run import pipeline
from qpeft.core.plugin import registry
from qpeft.core.dataset import templates
from qpeft.core.dataset.batch_source import EncodedBatches
from qpeft.core.cli.main import cli
from qpeft.core.base.errors import QpeftError
from qpeft.core.train.loss import token_loss_sum
from qpeft.core.interop import peft_import
from qpeft.core.run.record import RunRecord

peft = pytest.importorskip("peft")

EXACT = "none:compute_dtype=float32"
NF4 = "nf4:compute_dtype=float32"
# Each kind also exercises one way PEFT writes target_modules: leaf names, "all-linear"
# (saved as full paths), a regex string, and IA3's two lists.
KINDS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                    target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|v|up)_proj"),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]),
}
MAIN = list(KINDS)
# OLoRA rewrote the base; PEFT and qpeft both run it again on load (exactly over `none`;
# over nf4 qpeft re-quantizes the rewritten base, PEFT keeps it in fp32, so no nf4 parity).
KINDS["olora"] = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights="olora")
KINDS["pissa"] = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights="pissa")


@pytest.fixture(scope="module")
def base(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def written(base, tmp_path_factory):
    """kind → a directory PEFT wrote (its tensors perturbed, so B ≠ 0 and m, l ≠ their init)."""
    out = {}
    for kind, make in KINDS.items():
        model = peft.get_peft_model(copy.deepcopy(base), make())
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        out[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(out[kind])
    return out


@pytest.fixture(scope="module")
def quantized(tiny_dir):
    """The tiny model quantized by each quantizer, loaded once (copied per test)."""
    out = {}
    for quant in (EXACT, NF4):
        out[quant], _ = models.load_model(tiny_dir)
        pipeline.build_plugin("quantizer", quant, registry.default()).quantize_model(out[quant], progress=False)
    return out


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))


def theirs(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


def ours(quantized, directory, quant=EXACT):
    """What ``qpeft eval DIR`` and ``--init-adapter`` do once the base is quantized: read the
    directory, attach the spec it amounts to, load the tensors (rebuild.onto_base)."""
    model = copy.deepcopy(quantized[quant])
    imported = peft_import.read(directory)
    imported.composition.attach(model)
    imported.load(model)
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def edited(directory, tmp_path, **fields):
    """A copy of an adapter directory with adapter_config.json fields replaced."""
    copy_dir = tmp_path / "edited"
    shutil.copytree(directory, copy_dir)
    path = copy_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return copy_dir


def one_line(result) -> str:
    """The error of a failed command: one line (progress lines, "qpeft: …", aside)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("qpeft: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_peft_adapter_gives_peft_logits(quantized, base, written, batch, kind):
    spec = peft_import.read(written[kind]).spec
    assert spec.startswith("dora" if kind == "dora" else "ia3" if kind == "ia3" else "lora:r=4:alpha=8")
    assert spec.endswith("+rslora") == (kind == "rslora") and spec.endswith("+olora") == (kind == "olora")
    assert spec.endswith("+pissa:niter=0") == (kind == "pissa")
    expected = logits(theirs(base, written[kind]), batch)
    assert (logits(base, batch) - expected).abs().max() > 1e-2          # the adapter does something
    torch.testing.assert_close(logits(ours(quantized, written[kind]), batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", MAIN)
def test_over_nf4_it_matches_peft_over_the_dequantized_base(quantized, written, batch, kind):
    # PEFT runs on the nf4 base's exact dequantization (W_hat in fp32); qpeft runs nf4 with fp32
    # compute. The same weights and fp32 arithmetic in another order differ by rounding only
    # (measured ~1e-6 on these logits of size ~1); 1e-4 leaves room and is still far below the
    # nf4 error itself (logits move by ~1e-1 between the fp32 and the nf4 base).
    from qpeft.core.kinds.adapter_layers import merge_model

    dequantized = merge_model(copy.deepcopy(quantized[NF4])).eval()   # no adapter: nn.Linear of W_hat
    expected = logits(theirs(dequantized, written[kind]), batch)
    torch.testing.assert_close(logits(ours(quantized, written[kind], NF4), batch), expected, rtol=0, atol=1e-4)


def test_keys_saved_with_the_adapter_name_load_too(quantized, base, written, batch, tmp_path):
    from safetensors.torch import load_file, save_file

    for kind in ("dora", "ia3"):
        directory = tmp_path / kind
        shutil.copytree(written[kind], directory)
        path = directory / "adapter_model.safetensors"
        renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                   .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
                   .replace("ia3_l", "ia3_l.default"): t for k, t in load_file(str(path)).items()}
        assert all("default" in k for k in renamed)
        save_file(renamed, str(path))
        torch.testing.assert_close(logits(ours(quantized, directory), batch),
                                   logits(theirs(base, written[kind]), batch), rtol=0, atol=1e-5)


def test_training_continues_from_a_peft_adapter(tiny_dir, base, written, tmp_path):
    flags = ["--model", tiny_dir, "--quant", EXACT, "--evaluators", "perplexity", "--eval-limit", "4",
             "--batch-size", "4", "--lr", "1e-2", "--log-every", "1", "--save-every", "0",
             "--output-dir", str(tmp_path)]
    imported = CliRunner().invoke(cli, ["eval", str(written["lora"]), *flags[:6], "--limit", "4",
                                        "--out", str(tmp_path / "imported.json")])
    assert imported.exit_code == 0, imported.output
    before = json.loads((tmp_path / "imported.json").read_text())["results"]["perplexity"]["perplexity"]

    result = CliRunner().invoke(cli, ["run", "--init-adapter", str(written["lora"]), "--steps", "4", *flags])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / f"{EXACT}-init-{written['lora'].name}".replace(":", "_").replace("=", "")
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["config"]["init_adapter"] == str(written["lora"])
    assert resolved["adapter"]["spec"] == peft_import.read(written["lora"]).spec

    # step 1's loss is the imported adapter's loss on the first batch (PEFT computes it here)
    cfg = config.build(None, {"model": tiny_dir, "batch_size": 4})
    tokenizer = models.load_tokenizer(tiny_dir)
    items, _ = templates.encode_all(pipeline.plan(cfg).train, tokenizer, None, cfg.max_length)
    first = EncodedBatches(items, tokenizer.pad_token_id, cfg.train.seed).batch(0, 0, 4)
    with torch.no_grad():
        total, _ = token_loss_sum(theirs(base, written["lora"]), **first)
    expected = total.item() / int((first["labels"][:, 1:] != -100).sum())
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    after = json.loads((run_dir / "report.json").read_text())["after"]["perplexity"]["perplexity"]
    assert after < before

    # the run resumes from what config.json recorded; its saved adapter reads back as qpeft's own
    saved = RunRecord.read(run_dir).settings(run_dir)
    assert pipeline.plan(saved).adapter.spec == resolved["adapter"]["spec"]
    assert peft_import.read(run_dir / "adapter").written_by_qpeft
    line = one_line(CliRunner().invoke(cli, ["eval", str(run_dir), "--model", tiny_dir]))
    assert "--model: only for an adapter directory" in line


@pytest.mark.parametrize("field, value, expected", [
    ("peft_type", "LOHA", "peft_type 'LOHA' is not supported; qpeft loads ADALORA, IA3, LORA adapters"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern={\"q_proj\": 8} is not supported: qpeft uses one r"),
    ("alpha_pattern", {"q_proj": 32}, "alpha_pattern={\"q_proj\": 32} is not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save=[\"lm_head\"] is not supported: those modules were trained"),
    ("layers_to_transform", [0], "layers_to_transform=[0] is not supported: qpeft selects layers by name"),
    ("bias", "all", "bias=\"all\" is not supported: the adapter trained the base model's biases"),
    ("fan_in_fan_out", True, "fan_in_fan_out=true is not supported: that is for GPT-2-style Conv1D"),
    ("init_lora_weights", "corda", "init_lora_weights=\"corda\" is not supported: that initialisation rewrote"),
    ("lora_bias", True, "lora_bias=true is not supported"),
    ("use_qalora", True, "use_qalora=true is not supported: qpeft does not support it"),
    ("r", 8, "lora_A.weight has rank 4, but"),
])
def test_each_unsupported_field_is_one_line_naming_it(written, tmp_path, field, value, expected):
    directory = edited(written["lora"], tmp_path, **{field: value})
    with pytest.raises(QpeftError) as caught:
        peft_import.read(directory)
    message = str(caught.value)
    assert "\n" not in message and str(directory / "adapter_config.json") in message
    assert expected in message


@pytest.mark.parametrize("make, expected", [
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"]),
     "modules_to_save=[\"model.norm\"] is not supported"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
     "rank_pattern={\"v_proj\": 2} is not supported"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
     "holds a LoRA on the embedding model.embed_tokens; qpeft adapts linear layers only"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"]), "peft_type 'LOHA' is not supported"),
], ids=["modules_to_save", "rank_pattern", "embedding", "loha"])
def test_adapters_peft_writes_with_unsupported_parts_are_one_line(base, tmp_path, make, expected):
    peft.get_peft_model(copy.deepcopy(base), make()).save_pretrained(tmp_path)
    with pytest.raises(QpeftError) as caught:
        peft_import.read(tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_harmless_fields_are_accepted(written, tmp_path):
    directory = edited(written["lora"], tmp_path, init_lora_weights="gaussian", task_type="CAUSAL_LM",
                       layers_pattern="layers", loftq_config={}, some_future_field=None)
    assert peft_import.read(directory).spec == peft_import.read(written["lora"]).spec


def test_the_directory_is_checked_before_the_model_loads(monkeypatch, tiny_dir, written, tmp_path):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(streaming, "load_quantized", no_loading)
    bad = edited(written["lora"], tmp_path, rank_pattern={"q_proj": 8})
    line = one_line(CliRunner().invoke(cli, ["run", "--init-adapter", str(bad), "--model", tiny_dir,
                                             "--output-dir", str(tmp_path)]))
    assert "rank_pattern" in line
    line = one_line(CliRunner().invoke(cli, ["eval", str(tmp_path), "--model", tiny_dir]))
    assert f"{tmp_path} has no adapter_config.json" in line
    line = one_line(CliRunner().invoke(cli, ["run", "--init-adapter", str(written["lora"]), "--adapter", "dora",
                                             "--model", tiny_dir, "--output-dir", str(tmp_path)]))
    assert "--adapter 'dora' conflicts with the adapter in" in line and "drop --adapter" in line
    same = config.build(None, {"init_adapter": str(written["ia3"]), "adapter": "ia3:targets=k_proj,v_proj,down_proj",
                               "model": tiny_dir})
    assert pipeline.plan(same).adapter.method.name == "ia3"         # an equal --adapter is fine


def test_an_adapter_for_another_base_model_is_one_line(written, tmp_path):
    from qpeft.core.kit.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "other", intermediate=96)
    line = one_line(CliRunner().invoke(cli, ["eval", str(written["lora"]), "--model", other, "--quant", EXACT]))
    assert f"model.layers.0.mlp.down_proj.lora_A.weight is [4, 128], but {other}'s model.layers.0.mlp.down_proj " \
           "needs [4, 96] (in 96, out 64); the adapter was made for " in line   # from its config, before loading


def test_a_missing_tensor_is_one_line_naming_the_module(quantized, written, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "cut"
    shutil.copytree(written["dora"], directory)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(QpeftError, match=r"has no lora_B.weight for model.layers.1.mlp.up_proj \(this model's "
                                         r"layer needs \[128, 4\]\)"):
        ours(quantized, directory)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]
    save_file(tensors, str(path))   # the whole layer gone: the regex still selects it
    with pytest.raises(QpeftError, match="target_modules selects model.layers.1.mlp.up_proj, but"):
        ours(quantized, directory)
