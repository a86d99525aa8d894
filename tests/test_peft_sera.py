"""SERA as a PEFT tuner type: registration, trainable set, training, adapter and merged round trips, errors."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors import safe_open

from modeling_sera import SeraForReferringSegmentation, SeraTunerConfig, SeraTunerModel
from modeling_sera.peft_sera_layer import SeraAdapterLayer, SeraFusionLayer, SeraLayer
from modeling_sera.sera_adapter import SeraAdaptedMLP
from modeling_sera.sera_fusion import SeraFusion
from tests.helpers import REPO_ROOT, tiny_batch, tiny_sera_config
from tests.helpers.cross_process import ASSERT_LOGITS_CLOSE


# PeftModel reads transformers' deprecated `is_gradient_checkpointing`; that is between peft and transformers.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

HEAD_PREFIXES = ("model.neck.", "model.decoder.", "model.word_proj.", "projector.")
ENCODER_PREFIXES = ("model.vision_model.", "model.text_model.")


def build(seed: int = 0, **overrides) -> SeraForReferringSegmentation:
    torch.manual_seed(seed)
    return SeraForReferringSegmentation(tiny_sera_config(**overrides))


def build_baseline(seed: int = 0) -> SeraForReferringSegmentation:
    """The paper's baseline: no SERA modules, what the tuner injects into."""
    return build(seed, use_sera_adapter=False, use_sera_fusion=False)


def tiny_tuner_config(**overrides) -> SeraTunerConfig:
    """Tuner settings matching the tiny SERA model of conftest (adapters in blocks 1 and 3, fusion at all levels)."""
    return SeraTunerConfig.from_sera_config(tiny_sera_config(), **overrides)


def native_name(peft_name: str) -> str:
    """A PeftModel parameter name as the native SERA model calls it."""
    return SeraTunerModel._remove_adapter_name_from_key(peft_name, "default").removeprefix("base_model.model.")


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def papers_trainable_names(**overrides) -> set[str]:
    """The trainable set of a native SERA model in the paper's regime (`freeze_encoders`)."""
    native = build(**overrides)
    native.freeze_encoders()
    return trainable_names(native)


def group_of(name: str) -> str:
    if ".sera_adapter." in name:
        return "adapter"
    if name.startswith("model.fusion."):
        return "fusion"
    if name.startswith(HEAD_PREFIXES):
        return "head"
    assert name.startswith(ENCODER_PREFIXES), name
    return "encoder"


def train_steps(model, steps: int, lr: float = 1e-3) -> None:
    optimizer = torch.optim.Adam([param for param in model.parameters() if param.requires_grad], lr=lr)
    batch = tiny_batch(2, seed=1)
    labels = (torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()


def run_in_fresh_python(script: str, tmp_path, *, with_package: bool) -> subprocess.CompletedProcess:
    """Run `script` in a new interpreter with an empty, offline Hugging Face cache; the package is importable only
    when `with_package` (otherwise the run starts in an empty folder, as a user without the package would)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=tempfile.mkdtemp(dir=tmp_path), HF_HUB_OFFLINE="1")
    if with_package:
        env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO_ROOT if with_package else tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------------------------------- registration


def test_sera_is_a_registered_peft_type_and_its_config_round_trips(tmp_path):
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SERA"] is SeraTunerConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SERA"] is SeraTunerModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SERA"] == "sera_"
    config = tiny_tuner_config(fusion_top_k=2, train_head_in_place=False)
    assert config.peft_type == "SERA" and config.peft_type.value == "SERA"
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SERA"
    reloaded = PeftConfig.from_pretrained(tmp_path)  # resolved through peft's registry, not named by us
    assert type(reloaded) is SeraTunerConfig
    assert reloaded.to_dict() == config.to_dict()


def test_tuner_config_holds_only_what_differs_and_reads_the_rest_from_the_base_model():
    tuner = SeraTunerConfig(adapter_dim=8)  # a SeraConfig field, given directly
    assert tuner.sera_settings == {"adapter_dim": 8}
    assert tuner.train_encoder_norms_and_biases_in_place and tuner.train_head_in_place
    get_peft_model(build_baseline(), tuner)
    # Injection writes the modules' settings down in full: the base model's, with the tuner's on top.
    assert tuner.sera_settings["adapter_dim"] == 8
    assert tuner.sera_settings["adapter_layers"] == [1, 3] and tuner.sera_settings["fusion_router_hidden_size"] == 8
    with pytest.raises(ValueError, match="not SeraConfig fields"):
        SeraTunerConfig(sera_settings={"adapter_width": 8})


def test_an_adapter_config_saved_before_sera_settings_loads_with_its_settings(tmp_path):
    """adapter_config.json of 0.1.0 carries the module settings as top-level keys and the old switch names."""
    legacy = {
        "peft_type": "SERA",
        "task_type": None,
        "inference_mode": True,
        "adapter_dim": 16,
        "adapter_layers": [1, 3],
        "fusion_top_k": 2,
        "train_head": False,
        "train_encoder_norms_and_biases": True,
        "use_sera_adapter": True,
        "use_sera_fusion": True,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(legacy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword arguments ... ignored" from peft
        for loader in (PeftConfig, SeraTunerConfig):
            config = loader.from_pretrained(tmp_path)
            assert type(config) is SeraTunerConfig
            assert config.sera_settings == {"adapter_dim": 16, "adapter_layers": [1, 3], "fusion_top_k": 2}
            assert not config.train_head_in_place and config.train_encoder_norms_and_biases_in_place


# ------------------------------------------------------------------------------------------- trainable set


def test_injection_trains_exactly_the_papers_set_and_reports_it_truthfully():
    baseline = build_baseline()
    model = get_peft_model(baseline, tiny_tuner_config())

    blocks = baseline.model.vision_model.encoder.layer
    assert [isinstance(block.mlp, SeraAdapterLayer) for block in blocks] == [False, True, False, True]
    assert sorted(baseline.model.fusion) == ["0", "1", "2"]
    assert all(isinstance(fusion, SeraFusionLayer) for fusion in baseline.model.fusion.values())

    # The same set, under the same names once the adapter name is dropped, as a native SERA model in freeze_encoders().
    trainable = trainable_names(model)
    assert {native_name(name) for name in trainable} == papers_trainable_names()
    assert {group_of(native_name(name)) for name in trainable} == {"adapter", "fusion", "head", "encoder"}

    # print_trainable_parameters against counts taken without peft: the injected modules are the native ones.
    native = build()
    native.freeze_encoders()
    expected_trainable = sum(param.numel() for param in native.parameters() if param.requires_grad)
    expected_total = sum(param.numel() for param in native.parameters())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    numbers = [int(number.replace(",", "")) for number in re.findall(r"params: ([\d,]+)", printed.getvalue())]
    assert numbers == [expected_trainable, expected_total]
    assert model.get_nb_trainable_parameters() == (expected_trainable, expected_total)


@pytest.mark.parametrize(
    "switches, groups",
    [
        (dict(train_encoder_norms_and_biases_in_place=False), {"adapter", "fusion", "head"}),
        (dict(train_head_in_place=False), {"adapter", "fusion", "encoder"}),
        (
            dict(use_sera_fusion=False, train_head_in_place=False, train_encoder_norms_and_biases_in_place=False),
            {"adapter"},
        ),
        (dict(use_sera_adapter=False), {"fusion", "head", "encoder"}),
    ],
)
def test_each_group_is_switchable(switches, groups):
    model = get_peft_model(build_baseline(), tiny_tuner_config(**switches))
    trainable = {native_name(name) for name in trainable_names(model)}
    modules = {flag: switches.get(flag, True) for flag in ("use_sera_adapter", "use_sera_fusion")}
    assert {name for name in papers_trainable_names(**modules) if group_of(name) in groups} == trainable
    assert any(isinstance(m, SeraFusionLayer) for m in model.modules()) == (switches.get("use_sera_fusion", True))


@pytest.mark.parametrize("native_modules", [dict(), dict(use_sera_fusion=False)], ids=["adapters+fusion", "adapters"])
def test_a_sera_checkpoint_is_tuned_in_place_with_the_same_trainable_set(native_modules):
    native = build(**native_modules)
    model = get_peft_model(native, SeraTunerConfig.from_sera_config(native.config, use_sera_fusion=True))

    blocks = native.model.vision_model.encoder.layer
    for index in (1, 3):  # the checkpoint's own adapters, neither wrapped nor duplicated
        assert type(blocks[index].mlp) is SeraAdaptedMLP
        assert not isinstance(blocks[index].mlp.base_layer, (SeraAdaptedMLP, SeraLayer))
    assert not any(isinstance(module, SeraAdapterLayer) for module in model.modules())
    fusion_types = {type(fusion) for fusion in native.model.fusion.values()}
    assert fusion_types == ({SeraFusion} if not native_modules else {SeraFusionLayer})

    assert {native_name(name) for name in trainable_names(model)} == papers_trainable_names()
    # Same adapter checkpoint keys as when everything is injected into a baseline.
    injected = get_peft_model(build_baseline(), tiny_tuner_config())
    assert get_peft_model_state_dict(model).keys() == get_peft_model_state_dict(injected).keys()


def test_the_peft_path_computes_exactly_what_the_plain_model_computes():
    """The tuner's layers run the model's own modules: with the same weights, a baseline with injected SERA modules
    gives the native SERA model's logits, router weights and loss, to the bit."""
    native = build(seed=5)
    model = get_peft_model(build_baseline(seed=6), tiny_tuner_config())
    native_state = native.state_dict()
    assert {native_name(name) for name in model.state_dict()} == set(native_state)
    model.load_state_dict({name: native_state[native_name(name)] for name in model.state_dict()})
    batch = tiny_batch(2)
    labels = (torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    for mode in ("eval", "train"):  # train: router noise, BatchNorm batch statistics, the loss
        outputs = []
        for candidate in (native, model):
            getattr(candidate, mode)()
            torch.manual_seed(0)
            with torch.no_grad():
                outputs.append(candidate(**batch, labels=labels))
        expected, actual = outputs
        assert torch.equal(expected.logits, actual.logits), mode
        assert torch.equal(expected.loss, actual.loss), mode
        for name in ("adapter_router_weights", "fusion_router_weights"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(expected, name), getattr(actual, name), strict=True))


def test_three_adam_steps_change_every_trainable_tensor_and_no_frozen_one():
    model = get_peft_model(build_baseline(), tiny_tuner_config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainable = trainable_names(model)
    train_steps(model, 3)
    after = model.state_dict()
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    batchnorm_statistics = {name for name in before if name.endswith(statistics)}
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"trainable {name} did not change"
        elif name not in batchnorm_statistics:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    # BatchNorm statistics only live in SERA modules and the head, where they are expected to move.
    assert {group_of(native_name(name)) for name in batchnorm_statistics} <= {"adapter", "fusion", "head"}


def test_disabling_or_unloading_gives_back_the_base_model():
    baseline = build_baseline().eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = baseline(**batch).logits
    model = get_peft_model(baseline, tiny_tuner_config()).eval()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, reference)
        with pytest.warns(UserWarning, match="trained in place"), model.disable_adapter():
            assert torch.equal(model(**batch).logits, reference)
    unloaded = model.unload()
    assert not any(isinstance(module, SeraLayer) for module in unloaded.modules())
    assert len(unloaded.model.fusion) == 0 and not unloaded.config.use_sera_adapter
    with torch.no_grad():
        assert torch.equal(unloaded(**batch).logits, reference)


def test_with_nothing_trained_in_place_disabling_gives_the_base_model_after_training():
    baseline = build_baseline().eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = baseline(**batch).logits
    config = tiny_tuner_config(train_head_in_place=False, train_encoder_norms_and_biases_in_place=False)
    model = get_peft_model(baseline, config)
    train_steps(model, 2)  # BatchNorm statistics and weights of the injected modules move; nothing of the base
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing trained in place: no warning
            with model.disable_adapter():
                assert torch.equal(model(**batch).logits, reference)
        assert not torch.allclose(model(**batch).logits, reference)  # enabled again on leaving the block


# -------------------------------------------------------------------------------------------- round trips


def test_adapter_round_trip_in_a_fresh_process_right_after_importing_the_package(tmp_path):
    base = build_baseline(seed=3)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, tiny_tuner_config())
    train_steps(model, 2)  # moves norms, biases, head and BatchNorm statistics away from the saved base
    model.eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = model(**batch).logits
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter_dir))
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as checkpoint:
        saved = set(checkpoint.keys())
    # Exactly the trained tensors plus the BatchNorm statistics of SERA modules and head, named as in a SERA model.
    native = build()
    native.freeze_encoders()
    native_trainable = trainable_names(native)
    expected = {
        f"base_model.model.{name}"
        for name in native.state_dict()
        if name in native_trainable or (name not in dict(native.named_parameters()) and group_of(name) != "encoder")
    }
    assert saved == expected
    assert any(name.endswith("running_var") for name in saved)
    torch.save({"batch": batch, "reference": reference}, tmp_path / "expected.pt")

    result = run_in_fresh_python(
        f"""
        import warnings, torch
        import modeling_sera  # nothing else: importing the package must register SERA with peft
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained({str(adapter_dir)!r})
        assert type(config).__name__ == "SeraTunerConfig" and config.peft_type == "SERA", type(config)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = modeling_sera.SeraForReferringSegmentation.from_pretrained({str(tmp_path / "base")!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, {str(adapter_dir)!r})
        problems = [str(w.message) for w in caught if "missing" in str(w.message) or "lacks" in str(w.message)]
        assert not problems, problems
        assert not any(param.requires_grad for param in model.parameters())
        with torch.no_grad():
            logits = model(**expected["batch"]).logits
        reference = expected["reference"]
        {ASSERT_LOGITS_CLOSE}  # fp32 bounds: see tests/helpers/cross_process.py
        print("ADAPTER-OK")
        """,
        tmp_path,
        with_package=True,
    )
    assert "ADAPTER-OK" in result.stdout, result.stderr[-3000:]


def test_merge_and_unload_gives_a_plain_sera_model_that_loads_as_remote_code(tmp_path):
    settings = dict(
        adapter_layers=[0, 2], adapter_scale=0.5, fusion_levels=[1, 2], fusion_top_k=3, fusion_router_sentence=True
    )
    model = get_peft_model(build_baseline(seed=4), tiny_tuner_config(**settings))
    train_steps(model, 1)
    model.eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = model(**batch).logits

    merged = model.merge_and_unload()
    assert type(merged) is SeraForReferringSegmentation
    assert not hasattr(merged, "peft_config")
    assert not any(isinstance(module, SeraLayer) for module in merged.modules())
    assert [type(block.mlp).__name__ for block in merged.model.vision_model.encoder.layer] == [
        "SeraAdaptedMLP",
        "Dinov2WithRegistersMLP",
        "SeraAdaptedMLP",
        "Dinov2WithRegistersMLP",
    ]
    assert {level: type(fusion) for level, fusion in merged.model.fusion.items()} == {"1": SeraFusion, "2": SeraFusion}
    assert merged.config.use_sera_adapter and merged.config.use_sera_fusion
    assert {name: getattr(merged.config, name) for name in settings} == settings
    # The state dict a SERA model built from the merged config has: same names, same shapes.
    fresh = SeraForReferringSegmentation(merged.config)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, reference)

    merged_dir = tmp_path / "merged"
    merged.save_pretrained(merged_dir)
    torch.save({"batch": batch, "reference": reference}, tmp_path / "expected.pt")
    result = run_in_fresh_python(
        f"""
        import sys, torch
        from transformers import AutoModel
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModel.from_pretrained({str(merged_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert model.config.adapter_layers == [0, 2] and model.config.fusion_levels == [1, 2]
        with torch.no_grad():
            logits = model(**expected["batch"]).logits
        reference = expected["reference"]
        {ASSERT_LOGITS_CLOSE}  # fp32 bounds: see tests/helpers/cross_process.py
        assert not any(name.startswith(("modeling_sera", "peft")) for name in sys.modules), "needed the package"
        print("MERGED-OK")
        """,
        tmp_path,
        with_package=False,
    )
    assert "MERGED-OK" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fusion_top_k=5), "fusion_top_k=5 must be between 1 and 4"),
        (dict(adapter_num_heads=3), "adapter_num_heads=3 must divide adapter_dim=16"),
        (dict(adapter_layers=[1, 1]), "lists a block twice"),
        (dict(fusion_levels=[]), "at least one level"),
        (
            dict(
                use_sera_adapter=False,
                use_sera_fusion=False,
                train_head_in_place=False,
                train_encoder_norms_and_biases_in_place=False,
            ),
            "trains nothing",
        ),
    ],
)
def test_bad_tuner_settings_raise_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_tuner_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(adapter_layers=[1, 7]), "adapter_layers [7] do not exist in the 4-block vision backbone"),
        (dict(fusion_levels=[0, 3]), "fusion_levels=[0, 3] must be indices into vision_feature_layers"),
        (dict(fusion_context_num_heads=5), "fusion_context_num_heads=5 must divide the vision width 32"),
    ],
)
def test_settings_the_base_model_cannot_hold_raise_before_anything_changes(overrides, message):
    baseline = build_baseline()
    names_before = [name for name, _ in baseline.named_modules()]
    with pytest.raises(ValueError, match=re.escape(message)):
        get_peft_model(baseline, tiny_tuner_config(**overrides))
    assert [name for name, _ in baseline.named_modules()] == names_before


def test_misuse_raises_clear_errors():
    with pytest.raises(ValueError, match="settings must match the model's.*adapter_dim: tuner 32, model 16"):
        get_peft_model(build(), tiny_tuner_config(adapter_dim=32))
    with pytest.raises(ValueError, match="applies to a SeraForReferringSegmentation"):
        get_peft_model(build_baseline().model, tiny_tuner_config())
    model = get_peft_model(build_baseline(), tiny_tuner_config())
    with pytest.raises(ValueError, match="one SERA adapter at a time"):
        model.add_adapter("second", tiny_tuner_config())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="cannot be folded into the base weights"):
        model.merge_adapter()
