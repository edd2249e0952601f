"""The shipped shapes-64 family loads through the registry and loading.py, and runs."""
import json

import numpy as np

from pipelines import generation, loading, registry

ASSETS = registry.ROOT / "assets"


def test_assets_fit_the_budget_and_are_safetensors_only():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 80 * 1024 * 1024
    assert not [p for p in files if p.suffix in loading.PICKLE_SUFFIXES]
    for p in files:
        if p.suffix == ".safetensors":
            loading.check_safetensors(p)


def test_teacher_loads_through_registry_and_generates():
    spec = registry.MODELS["shapes-64-teacher"]
    assert registry.installed(spec)
    res = generation.generate("shapes-64-teacher", "a red circle", steps=4, seed=0)
    img = np.asarray(res.images[0])
    assert img.shape == (64, 64, 3) and img.std() > 1  # not a constant image
    pipe = loading.load_pipeline("shapes-64-teacher")
    # v-prediction with zero terminal SNR (rescaled betas, or shifted betas stored as trained_betas: teacher.schedule)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and float(pipe.scheduler.alphas_cumprod[-1]) == 0.0


def test_clip_reward_model_loads_and_its_text_tower_is_the_teachers():
    model, tok = loading.load_clip(registry.SHAPES_CLIP)
    teacher = loading.load_pipeline("shapes-64-teacher").text_encoder
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    a = model.text_model(ids).last_hidden_state
    b = teacher(ids)[0]
    assert (a - b).abs().max() < 1e-4


def test_recipe_record_lists_every_stage_it_ran():
    record = json.loads((ASSETS / "models" / "shapes-64" / "recipe.json").read_text())
    for stage in ("tokenizer", "clip", "vae", "teacher"):
        assert record[stage]["wall_seconds"] > 0


def test_shapes_world_membership():
    assert registry.in_shapes_world(registry.MODELS["shapes-64-teacher"])
    assert registry.in_shapes_world(registry.get(str(registry.ROOT / "assets/models/shapes-64/teacher")))
    assert not registry.in_shapes_world(registry.MODELS["stabilityai/sd-turbo"])


def test_shipped_msd_routes_by_category_to_lora_students_on_the_one_step_student():
    from pipelines import msd

    spec = registry.MODELS["shapes-64-msd"]
    assert registry.installed(spec)
    meta = msd.read(spec.path)
    student_unet = (ASSETS / "models" / "shapes-64" / "student" / "unet").resolve()
    for name in meta["students"]:
        assert registry.component_folder(spec.path / name, "unet") == student_unet
        assert (spec.path / name / registry.LORA_FILE).stat().st_size < 2 * 1024 * 1024
    res = generation.generate("shapes-64-msd", "three red circles", seed=0)
    assert res.settings["student"] == 2 and res.settings["model"] == "shapes-64-msd"
    img = np.asarray(res.images[0])
    assert img.shape == (64, 64, 3) and img.std() > 1
