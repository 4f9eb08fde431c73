"""mixtral_ft.model.load: what load_model, apply_lora and the adapter helpers accept, what they refuse in one line
(a non-YAML adapter recipe, modules peft cannot adapt, lm_head under TRL's fused head, bf16 experts from an NF4
folder), and what an adapter save holds."""

import pytest
import torch

from tests.conftest import ROOT


def test_an_adapter_whose_recipe_is_not_yaml_is_one_line_and_exit_2(tmp_path, capsys):
    from mixtral_ft.cli import main

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text("model: [tiny\n")
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.yaml' is not valid YAML" in err[0], err


@pytest.mark.parametrize(
    "target, reason, fix",
    [
        ("experts", "Target module NF4Experts", "adapt linear layers only"),
        # The router's weight takes LoRA through peft's ParamWrapper, without dropout: plan sizes it, so it is usable.
        ("gate", "does not work with lora_dropout != 0", "set lora.dropout: 0"),
    ],
)
def test_a_target_peft_cannot_adapt_is_one_line_and_exit_2(target, reason, fix, capsys):
    """allow_other_targets let these through validate; audit and train then died in peft with a traceback."""
    from mixtral_ft.cli import main

    overrides = ["lora.allow_other_targets=true", f"lora.target_modules=[q_proj,{target}]"]
    assert main(["audit", str(ROOT / "recipes" / "tiny.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: lora.target_modules ['{target}']") and reason in err[0], err
    assert fix in err[0], err
    if target == "gate":  # and with the fix, the same recipe loads
        assert main(["audit", str(ROOT / "recipes" / "tiny.yaml"), *overrides, "lora.dropout=0"]) == 0


def test_recipe_knows_every_module_name_of_mixtral(tiny_dir):
    """recipe/rules.py refuses a LoRA target no module has (peft would skip it silently): its list is the model's."""
    from mixtral_ft.model.load import load_model
    from mixtral_ft.recipe.rules import MIXTRAL_MODULES

    model = load_model(tiny_dir, device="cpu")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    assert {n for n in names if not n.isdigit()} == set(MIXTRAL_MODULES)


def test_trl_fused_head_gives_lm_head_lora_no_gradient(tiny_dir):
    """Why lora.target_modules refuses lm_head: TRL's fused LM head multiplies by the base weight. If TRL ever
    routes it through the LoRA, this fails and the refusal (recipe/rules.py, load.py) can go."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from mixtral_ft.model.load import load_model

    torch.manual_seed(0)
    base = load_model(tiny_dir, device="cpu")
    add_fused_lm_head(base)  # as TRL's SFT and DPO trainers do, before peft
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(base, config)
    ids = torch.randint(3, 100, (1, 12))
    model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
    head_lora = [p for n, p in model.named_parameters() if "lm_head.lora_" in n]
    attention_lora = [p for n, p in model.named_parameters() if "q_proj.lora_" in n]
    assert head_lora and all(p.grad is None for p in head_lora)
    assert attention_lora and all(p.grad is not None for p in attention_lora)


def test_continuing_an_adapter_with_lm_head_lora_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from mixtral_ft.cli import main
    from mixtral_ft.model.load import load_model

    adapter = tmp_path / "foreign_adapter"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    # A foreign adapter, saved as peft saves one with lm_head in its targets (the whole head too, peft warns).
    get_peft_model(load_model(tiny_dir, device="cpu"), config).save_pretrained(adapter, save_embedding_layers=True)
    out = tmp_path / "run"
    assert (
        main(["train", str(ROOT / "recipes" / "tiny.yaml"), f"model.adapter={adapter}", f"train.output_dir={out}"]) == 2
    )
    stdout, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and "puts LoRA on lm_head" in err[0] and "fused LM head" in err[0], err
    assert not stdout.strip(), stdout  # said in train's early checks, before the data report and the model load
    assert not out.exists() or not any(out.iterdir())


def test_unquantized_experts_from_a_pre_quantized_folder_are_refused(tmp_path, capsys):
    """A folder from `mixtral-ft quantize` holds NF4 experts only: model.quantize_experts: false used to load them
    as NF4 anyway (and audit noted 'kept unquantized (nf4)'); now it is one line naming the fix."""
    from mixtral_ft.cli import main

    nf4 = tmp_path / "nf4"
    assert main(["quantize", "tiny", str(nf4)]) == 0
    capsys.readouterr()
    argv = ["audit", str(ROOT / "recipes" / "tiny.yaml"), f"model.name={nf4}"]
    assert main([*argv, "model.quantize_experts=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NF4 experts" in err[0] and "model.quantize_experts" in err[0], err
    assert main(argv) == 0  # the folder as it is
    capsys.readouterr()
    # train says so in its checks before the data and the model load: nothing printed to stdout yet
    run = ["train", argv[1], argv[2], "model.quantize_experts=false", f"train.output_dir={tmp_path / 'run'}"]
    assert main(run) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "NF4 experts" in err and not out.strip(), (out, err)


@pytest.mark.slow
def test_a_checkpoint_of_a_hub_run_with_a_revision_serves_from_its_local_base(
    tiny_dir, tmp_path, tmp_path_factory, capsys
):
    """A checkpoint-N folder of a run on a Hub id at model.revision records the local snapshot it loaded (peft's
    base_model_name_or_path); chat and merge load that folder, which is the revision already. Passing the revision
    along with it was refused ('model.revision applies to a Hub id')."""
    import json
    import shutil

    import yaml

    from mixtral_ft.cli import main
    from tests.conftest import trained_adapter

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(trained_adapter(tmp_path_factory), checkpoint)
    recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    recipe["model"] |= {"name": "mistralai/Mixtral-8x7B-v0.1", "revision": "v0.1"}
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tiny_dir)}))
    assert main(["chat", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert main(["merge", str(checkpoint), "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err


def test_adapter_saves_hold_lora_tensors_only_and_ask_the_hub_nothing(tiny_dir, tmp_path, monkeypatch):
    """peft's save_embedding_layers="auto" saved the whole base embedding with an embed_tokens LoRA (Mixtral: 262 MB
    a save) and, for any other adapter on a Hub base, asked the Hub for its config.json at every save. We never
    resize the vocabulary, so neither is needed: saved the way Trainer._save saves, on the real PeftModel."""
    import peft.utils.save_and_load
    from safetensors.torch import load_file

    from mixtral_ft.model.load import apply_lora, load_adapter, load_model
    from mixtral_ft.recipe import load_recipe

    hub_asks = []
    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", lambda *a, **k: hub_asks.append(a))
    overrides = ["lora.allow_other_targets=true", "lora.target_modules=[q_proj, embed_tokens]"]
    lora = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides).lora
    base = load_model(tiny_dir, device="cpu", compute_dtype="float32")
    embedding_bytes = base.model.embed_tokens.weight.nbytes
    model = apply_lora(base, lora)
    model.peft_config["default"].base_model_name_or_path = "mistralai/Mixtral-8x7B-v0.1"  # as a Hub run records it
    model.save_pretrained(str(tmp_path / "fresh"), state_dict=None, is_main_process=True)
    saved = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in key for key in saved), sorted(saved)
    assert any("embed_tokens.lora_embedding_A" in key for key in saved), sorted(saved)
    assert (tmp_path / "fresh" / "adapter_model.safetensors").stat().st_size < embedding_bytes / 2
    # Continued from that adapter (model.adapter), the same; and it loads back with its LoRA weights.
    fresh_base = load_model(tiny_dir, device="cpu", compute_dtype="float32")
    continued = apply_lora(fresh_base, lora, adapter=str(tmp_path / "fresh"))
    continued.save_pretrained(str(tmp_path / "continued"), is_main_process=True)
    assert load_file(str(tmp_path / "continued" / "adapter_model.safetensors")).keys() == saved.keys()
    reloaded = load_adapter(load_model(tiny_dir, device="cpu", compute_dtype="float32"), tmp_path / "continued")
    state = {k: v for k, v in reloaded.state_dict().items() if ".lora_" in k}
    assert state and all(torch.equal(v, saved[k.replace(".default", "")]) for k, v in state.items())
    # An attention-only adapter on a Hub base: "auto" asked the Hub whether the base's config.json exists.
    lora = load_recipe(ROOT / "recipes" / "tiny.yaml", ["lora.target_modules=[q_proj]"]).lora
    attention = apply_lora(load_model(tiny_dir, device="cpu", compute_dtype="float32"), lora)
    attention.peft_config["default"].base_model_name_or_path = "mistralai/Mixtral-8x7B-v0.1"
    attention.save_pretrained(str(tmp_path / "attention"), is_main_process=True)
    assert all(".lora_" in key for key in load_file(str(tmp_path / "attention" / "adapter_model.safetensors")))
    assert hub_asks == []
