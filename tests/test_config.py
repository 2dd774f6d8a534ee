"""TrainingConfig: flat JSON/YAML form, presets, model-following defaults and every validation rule."""

from __future__ import annotations

import json
import shutil

import pytest
from train_support import fast_config, make_home

from zimage.config import (
    FIELD_NAMES,
    PRESETS,
    ConfigError,
    MachineInfo,
    TrainingConfig,
    build_config,
    config_from_dict,
    parse_override,
    read_config_file,
    validate_config,
)
from zimage.errors import UserError
from zimage.training.lora_io import LoraModule, save_lora

CPU = MachineInfo(cuda=False, bf16=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return make_home(tmp_path_factory.mktemp("cfg") / "home", tiny_model_dir)


def problems_of(settings, machine=CPU, **overrides) -> list:
    with pytest.raises(ConfigError) as info:
        validate_config(build_config(fast_config(**overrides)), settings, machine)
    return info.value.problems


# -- the flat form ----------------------------------------------------------------------------------
def test_plan_fields_are_all_accepted_in_flat_form():
    plan_fields = [
        "model_path",
        "model_type",
        "use_training_adapter",
        "dataset_path",
        "resolution",
        "lora_rank",
        "lora_alpha",
        "train_text_encoder",
        "learning_rate",
        "num_steps",
        "batch_size",
        "gradient_accumulation",
        "optimizer",
        "lr_scheduler",
        "quantize",
        "quantize_te",
        "gradient_checkpointing",
        "mixed_precision",
        "output_name",
        "output_dir",
        "save_every_n_steps",
        "sample_every_n_steps",
        "sample_prompt",
        "sample_steps",
        "sample_cfg",
    ]
    assert set(plan_fields) <= set(FIELD_NAMES)
    config = config_from_dict({"learning_rate": "1e-4", "num_steps": 10.0, "lora_alpha": 16, "output_dir": None})
    assert config.learning_rate == 1e-4 and config.num_steps == 10 and config.lora_alpha == 16.0
    assert config.config_version == 1


def test_json_and_yaml_files_load_the_same(tmp_path):
    data = {"model_path": "tiny-zimage", "lora_rank": 8, "learning_rate": 2e-4, "mixed_precision": "no"}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(
        "model_path: tiny-zimage\nlora_rank: 8\nlearning_rate: 2e-4\nmixed_precision: no\n"
    )  # YAML 1.1 reads 2e-4 as a string and `no` as false: both must still work
    a = config_from_dict(read_config_file(tmp_path / "c.json"))
    b = config_from_dict(read_config_file(tmp_path / "c.yaml"))
    assert a == b and b.mixed_precision == "no" and b.learning_rate == 2e-4


def test_nested_sections_flatten():
    config = build_config({"lora": {"lora_rank": 12, "lora_alpha": 6}, "training": {"num_steps": 7}})
    assert (config.lora_rank, config.lora_alpha, config.num_steps) == (12, 6.0, 7)


def test_unknown_keys_and_bad_types_are_all_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lora_rnak": 8, "num_steps": "many", "overwrite": "yes", "sample_prompts": "a cat"})
    text = str(info.value)
    fields = {p.field for p in info.value.problems}
    assert fields == {"lora_rnak", "num_steps", "overwrite", "sample_prompts"}
    assert "unknown key" in text and "did you mean 'lora_rank'" in text
    assert "num_steps = 'many': must be an integer" in text
    assert "overwrite = 'yes': must be true or false" in text


def test_bad_config_files_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_config_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="list.yaml: must hold a mapping"):
        read_config_file(tmp_path / "list.yaml")
    with pytest.raises(UserError, match="missing.yaml: cannot be read"):
        read_config_file(tmp_path / "missing.yaml")


def test_overrides_parse_as_yaml_values():
    assert parse_override("lora_rank=16") == ("lora_rank", 16)
    assert parse_override("sample_prompts=[a cat, a dog]") == ("sample_prompts", ["a cat", "a dog"])
    assert parse_override("trigger_word=ohwx person") == ("trigger_word", "ohwx person")
    with pytest.raises(UserError, match="expected key=value"):
        parse_override("lora_rank")


# -- presets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("full_finetune")])
def test_every_lora_preset_validates(home, name):
    config = build_config(
        {"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "optimizer": "adamw"}, preset=name
    )
    resolved = validate_config(config, home, CPU)
    assert resolved.config.training_type == "lora"
    for key, value in PRESETS[name].items():
        if key not in ("model_path",):
            assert getattr(resolved.config, key) == value, key


def test_full_finetune_base_preset_validates_on_a_base_model(home):
    config = build_config({"model_path": "tiny-zimage", "model_type": "base", "dataset_path": "demo-shapes"},
                          preset="full_finetune_base")  # fmt: skip
    resolved = validate_config(config, home, CPU)
    assert (resolved.config.training_type, resolved.config.model_type) == ("finetune", "base")
    assert resolved.validation_fraction == 0.1


def test_full_finetune_preset_validates_on_a_de_turbo_model(home):
    config = build_config({"model_path": "tiny-zimage", "dataset_path": "demo-shapes"}, preset="full_finetune")
    assert config.training_type == "finetune" and config.learning_rate == 1e-5
    resolved = validate_config(config, home, CPU)  # tiny-zimage is De-Turbo-typed; Turbo: tests/test_finetune.py
    assert resolved.output_path == home.finetuned_dir / "full_finetune"


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(UserError, match="quick_test, character_lora"):
        build_config({}, preset="nope")


# -- defaults that follow the model -----------------------------------------------------------------
def test_defaults_follow_the_model_type(home):
    base = home.base_models_dir
    for name in ("my-turbo", "my-de-turbo"):
        if not (base / name).exists():
            shutil.copytree(base / "tiny-zimage", base / name)
            (base / name / "zimage_model.json").unlink()  # the type then comes from the folder name
    adapter = home.adapter_dir / "zimage_turbo_training_adapter_v2.safetensors"
    if not adapter.exists():
        import torch

        save_lora(adapter, {"layers.0.attention.to_q": LoraModule(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)})

    turbo = validate_config(build_config(fast_config(model_path="my-turbo")), home, CPU).config
    assert (turbo.model_type, turbo.use_training_adapter, turbo.sample_steps, turbo.sample_cfg) == (
        "turbo",
        True,
        8,
        1.0,
    )
    assert turbo.training_adapter_path == str(adapter)
    de_turbo = validate_config(build_config(fast_config(model_path="my-de-turbo")), home, CPU).config
    assert (de_turbo.model_type, de_turbo.use_training_adapter) == ("de_turbo", False)
    assert (de_turbo.sample_steps, de_turbo.sample_cfg) == (25, 3.0)
    chosen = validate_config(build_config(fast_config(model_path="my-turbo", sample_steps=9)), home, CPU).config
    assert chosen.sample_steps == 9


def test_timestep_shift_follows_the_models_scheduler_unless_set(home):
    import json

    folder = home.base_models_dir / "shift5-de-turbo"
    if not folder.exists():
        shutil.copytree(home.base_models_dir / "tiny-zimage", folder)
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "shift": 5.0}))
    assert TrainingConfig().timestep_shift is None
    assert validate_config(build_config(fast_config()), home, CPU).config.timestep_shift == 3.0  # the tiny model's
    assert validate_config(build_config(fast_config(model_path=folder.name)), home, CPU).config.timestep_shift == 5.0
    mine = validate_config(build_config(fast_config(model_path=folder.name, timestep_shift=2.0)), home, CPU)
    assert mine.config.timestep_shift == 2.0


def test_resolved_config_fills_dataset_and_output_defaults(home):
    resolved = validate_config(build_config(fast_config()), home, CPU)
    c = resolved.config
    assert c.trigger_word == "zshape"  # from dataset.json
    assert c.min_image_side == 64 and c.output_dir == str(home.loras_dir)
    assert resolved.output_path == home.loras_dir / "test_lora.safetensors"
    assert resolved.dataset_dir == home.datasets_dir / "demo-shapes"
    assert resolved.model_dir == home.base_models_dir / "tiny-zimage"
    # a folder path works as well as a dataset name
    by_path = validate_config(build_config(fast_config(dataset_path=str(resolved.dataset_dir))), home, CPU)
    assert by_path.dataset_dir == resolved.dataset_dir


# -- every validation rule names its field ---------------------------------------------------------
RULES = [
    ({"lora_rank": 0}, "lora_rank", ">= 1"),
    ({"lora_alpha": 0}, "lora_alpha", "> 0"),
    ({"lora_dropout": 1.0}, "lora_dropout", "< 1"),
    ({"learning_rate": 0}, "learning_rate", "> 0"),
    ({"learning_rate": -1e-4}, "learning_rate", "> 0"),
    ({"resolution": 500}, "resolution", "multiple of 16"),
    ({"resolution": 128}, "resolution", "from 256"),
    ({"num_steps": 0}, "num_steps", ">= 1"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"gradient_accumulation": 0}, "gradient_accumulation", ">= 1"),
    ({"log_every_n_steps": 0}, "log_every_n_steps", ">= 1"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps", ">= 0"),
    ({"save_every_n_steps": -5}, "save_every_n_steps", ">= 0"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"weight_decay": -0.1}, "weight_decay", ">= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", ">= 0"),
    ({"caption_dropout": 1.5}, "caption_dropout", ">= 0 and <= 1"),
    ({"min_image_side": 4}, "min_image_side", ">= 8"),
    ({"optimizer": "sgd9000"}, "optimizer", "adamw, adamw8bit, adafactor, prodigy"),
    ({"lr_scheduler": "wobbly"}, "lr_scheduler", "cosine"),
    ({"timestep_sampling": "random"}, "timestep_sampling", "sigmoid"),
    ({"timestep_shift": 0}, "timestep_shift", "> 0"),
    ({"logit_std": 0}, "logit_std", "> 0"),
    ({"loss_weighting": "heavy"}, "loss_weighting", "sigma_sqrt"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "bf16, fp16, no"),
    ({"mixed_precision": "fp16"}, "mixed_precision", "needs a CUDA GPU"),
    ({"save_dtype": "int4"}, "save_dtype", "bf16, fp16, fp32"),
    ({"sample_steps": 0}, "sample_steps", ">= 1"),
    ({"sample_cfg": 0.5}, "sample_cfg", ">= 1 and <= 30"),
    ({"model_type": "turbo-ish"}, "model_type", "turbo, de_turbo"),
    ({"training_type": "dreambooth"}, "training_type", "lora, finetune"),
    ({"train_text_encoder": True, "training_type": "finetune"}, "train_text_encoder", "not supported"),
    ({"quantize": True}, "quantize", "needs a CUDA GPU"),
    ({"quantize_te": True}, "quantize_te", "needs a CUDA GPU"),
    ({"lora_target_modules": ["attention.qkv"]}, "lora_target_modules", "attention.to_q"),
    ({"lora_target_modules": []}, "lora_target_modules", "non-empty"),
    ({"lora_target_blocks": ["decoder"]}, "lora_target_blocks", "layers, noise_refiner"),
    (
        {"lora_target_blocks": ["context_refiner"], "lora_target_modules": ["adaLN_modulation.0"]},
        "lora_target_modules",
        "no adaLN_modulation",
    ),
    ({"output_name": "../evil"}, "output_name", "must not contain slashes"),
    ({"output_name": "My LoRA"}, "output_name", "lowercase letters"),
    ({"model_path": "no-such-model"}, "model_path", "Unknown model"),
    ({"model_path": "z-image-turbo"}, "model_path", "zimage models download z-image-turbo"),
    ({"dataset_path": ""}, "dataset_path", "required"),
    ({"dataset_path": "no-such-dataset"}, "dataset_path", "no such dataset"),
    ({"use_training_adapter": True}, "use_training_adapter", "for Turbo models"),
    ({"config_version": 99}, "config_version", "reads config_version 1"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"), RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(RULES)]
)
def test_each_rule_names_field_value_and_what_is_allowed(home, overrides, field, allowed):
    problems = problems_of(home, **overrides)
    mine = [p for p in problems if p.field == field]
    assert mine, f"no problem for {field}: {problems}"
    text = str(mine[0])
    assert text.startswith(f"{field} = ") and allowed in text
    value = overrides.get(field, next(iter(overrides.values())))
    if field not in ("model_path", "dataset_path"):
        assert repr(value) in text or str(value) in text


def test_bf16_on_a_gpu_without_bf16_is_refused(home):
    problems = problems_of(home, machine=MachineInfo(cuda=True, bf16=False), mixed_precision="bf16")
    assert any(p.field == "mixed_precision" and "no bf16 support" in str(p) for p in problems)


def test_an_optimizer_this_machine_cannot_run_is_a_validation_error(home, monkeypatch):
    """On a machine without CUDA the probe really fails on the cuda device: no crash, a named problem.
    The probe runs on CUDA only in a process that initialised CUDA already (a worker, simulated here): in
    the app server it would create a CUDA context, so there only the optimizer's library is checked."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to see the probe fail")
    cuda = MachineInfo(cuda=True, bf16=True)
    assert validate_config(build_config(fast_config(optimizer="adamw")), home, cuda).machine == cuda  # no probe
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    problems = problems_of(home, machine=cuda, optimizer="adamw")
    mine = [p for p in problems if p.field == "optimizer"]
    assert mine and "cannot run on this machine" in str(mine[0]) and "choose another optimizer" in str(mine[0])


def test_type_and_value_problems_come_in_two_rounds_but_each_lists_all(home):
    with pytest.raises(ConfigError) as info:
        build_config(fast_config(bogus=1, lora_rank="x"))
    assert {p.field for p in info.value.problems} == {"bogus", "lora_rank"}
    problems = problems_of(home, lora_rank=0, learning_rate=0, resolution=500, dataset_path="nope")
    assert {"lora_rank", "learning_rate", "resolution", "dataset_path"} <= {p.field for p in problems}


def test_dataset_without_usable_images_is_refused(home):
    folder = home.datasets_dir / "broken-only" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not an image")
    problems = problems_of(home, dataset_path="broken-only")
    assert any(p.field == "dataset_path" and "none of its 2 images is usable" in str(p) for p in problems)
    (home.datasets_dir / "empty" / "images").mkdir(parents=True, exist_ok=True)
    problems = problems_of(home, dataset_path="empty")
    assert any(p.field == "dataset_path" and "no images" in str(p) for p in problems)


def test_existing_output_is_refused_unless_overwrite(home):
    target = home.loras_dir / "taken.safetensors"
    target.write_bytes(b"precious")
    problems = problems_of(home, output_name="taken")
    assert any(p.field == "output_name" and "already exists" in str(p) and "overwrite" in str(p) for p in problems)
    resolved = validate_config(build_config(fast_config(output_name="taken", overwrite=True)), home, CPU)
    assert resolved.output_path == target and target.read_bytes() == b"precious"  # validation writes nothing


def test_turbo_adapter_missing_says_how_to_get_it(home):
    base = home.base_models_dir
    if not (base / "other-turbo").exists():
        shutil.copytree(base / "tiny-zimage", base / "other-turbo")
        (base / "other-turbo" / "zimage_model.json").unlink()
    problems = problems_of(home, model_path="other-turbo", training_adapter_path="adapters/missing.safetensors")
    assert any(p.field == "use_training_adapter" and "is missing" in str(p) for p in problems)


def test_to_dict_round_trips():
    config = TrainingConfig(lora_rank=3, sample_prompts=["a", "b"])
    assert config_from_dict(config.to_dict()) == config


def test_lr_scheduler_names_are_diffusers_own():
    """The list the app validates against (without importing diffusers) is diffusers' SchedulerType."""
    from diffusers.optimization import SchedulerType

    from zimage.config.schema import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} - {"piecewise_constant"}


def test_torch_cuda_build_read_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from zimage.config.validate import torch_has_cuda, MachineInfo; "
            "print(torch_has_cuda(), MachineInfo.detect().cuda, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import torch

    assert out == [str(torch.version.cuda is not None), str(torch.cuda.is_available()), "False"]
