"""DMD2 on tiny real components: single process, LoRA on SDXL, GAN head, 2-process accelerate + resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint
from training.config import Dmd2Config, save_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na photo of a cat\na green dog\n")
    return path


def _cfg(tmp_path, teacher, prompt_file, **kw):
    base = dict(teacher=str(teacher), run_dir=str(tmp_path / "run"), prompts=str(prompt_file), steps=2, batch_size=2,
                height=64, width=64, ratio=1, save_every=2, log_every=1, warmup=1, lr=1e-3)
    return Dmd2Config(**(base | kw))


def _changed(before: dict, module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_dmd2_one_step_updates_generator_and_exports(tmp_path, tiny_sd, prompt_file):
    from pipelines import generation, registry
    from training.methods import dmd2

    cfg = _cfg(tmp_path, tiny_sd, prompt_file, ratio=2)  # the generator updates at step 1 only
    d = dmd2.Distiller(cfg, "cpu")
    before = {k: v.clone() for k, v in d.generator.state_dict().items()}
    res = dmd2.train(cfg)
    assert res["finished"] and res["step"] == 2 and "loss_dm" in res and "loss_fake" in res
    assert _changed(before, res["distiller"].generator)
    out = dmd2.export(res, cfg, tmp_path / "student")
    spec = registry.get(str(out))
    assert spec.role == "student" and spec.timesteps == (999,) and spec.teacher == str(tiny_sd)
    assert generation.generate(str(out), "a red circle", height=64, width=64).images[0].size == (64, 64)
    # the 2-step log line carries the generator's loss of step 1 (it updates every `ratio` steps)
    assert "loss_dm" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # re-exporting keeps the student's NCT adapters
    meta = json.loads((out / "onestep.json").read_text())
    (out / "onestep.json").write_text(json.dumps({**meta, "nct": {"canny": "../nct-canny"}}))
    dmd2.export(res, cfg, out)
    assert json.loads((out / "onestep.json").read_text())["nct"] == {"canny": "../nct-canny"}


def test_fake_warmup_counts_from_a_warm_starts_step(tmp_path, tiny_sd, tiny_student, prompt_file):
    """A generator warm-started at step 10 (a trained student, a changed teacher) waits `fake_warmup` steps
    from there, not from step 0, while its fake score fits it."""
    from training.methods import dmd2

    start = {k: v.clone() for k, v in dmd2.Distiller(
        _cfg(tmp_path, tiny_sd, prompt_file, generator_init=str(tiny_student / "unet")), "cpu").generator.state_dict().items()}
    for steps, moved in ((12, False), (13, True)):  # warm-up steps 10 and 11; the generator's first update at 12
        cfg = _cfg(tmp_path, tiny_sd, prompt_file, generator_init=str(tiny_student / "unet"), init_step=10,
                   fake_warmup=2, steps=steps, run_dir=str(tmp_path / f"run{steps}"))
        res = dmd2.train(cfg)
        assert res["finished"] and _changed(start, res["distiller"].generator) is moved


def test_dmd2_four_step_backward_simulation(tmp_path, tiny_sd_v, prompt_file):
    from training.methods import dmd2

    cfg = _cfg(tmp_path, tiny_sd_v, prompt_file, timesteps=(999, 749, 499, 249), steps=3)
    res = dmd2.train(cfg)
    assert res["finished"] and torch.isfinite(torch.tensor(res["loss_dm"]))


def test_dmd2_lora_generator_and_lora_fake_on_tiny_sdxl(tmp_path, tiny_sdxl, prompt_file):
    from training.methods import dmd2

    cfg = _cfg(tmp_path, tiny_sdxl, prompt_file, generator_lora_rank=4, fake_lora_rank=4)
    d = dmd2.Distiller(cfg, "cpu")
    trainable = [n for n, p in d.generator.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    res = dmd2.train(cfg)
    gen = res["distiller"].generator
    lora = {k: v for k, v in gen.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at zero; training moved it
    student = dmd2.export(res, cfg, tmp_path / "student")
    merged = load_file(str(next((student / "unet").glob("*.safetensors"))))
    assert not any("lora" in k for k in merged)


def test_dmd2_gan_head_trains_on_shapes_world(tmp_path, tiny_sd):
    from training.methods import dmd2

    cfg = Dmd2Config(teacher=str(tiny_sd), run_dir=str(tmp_path / "run"), prompts="shapes", steps=2, batch_size=2,
                     height=64, width=64, ratio=1, gan_weight=1e-3, warmup=1, lr=1e-3, eval_images=2, data_size=16)
    res = dmd2.train(cfg)
    assert res["finished"] and "loss_d" in res and "loss_gan_g" in res
    # the real latents are the pool's, encoded once into the run folder
    assert load_file(str(tmp_path / "run" / "latents.safetensors"))["latents"].shape[0] == 16
    assert "sample_shapeeval" in (tmp_path / "run" / "metrics.jsonl").read_text()  # the evaluation hook ran
    with pytest.raises(ValueError, match="GAN term needs real images"):
        dmd2.train(Dmd2Config(teacher=str(tiny_sd), run_dir=str(tmp_path / "r2"), prompts=str(tmp_path), gan_weight=1.0))


def test_accelerate_two_processes_stop_resume(tmp_path, tiny_sd, prompt_file):
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "config.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch(steps):
        save_json(_cfg(tmp_path, tiny_sd, prompt_file, steps=steps), cfg_path)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "training.run", "--config", str(cfg_path)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    launch(2)
    first = checkpoint.latest(run_dir)
    assert first.name == "step-00000002"
    gen_before = load_file(str(first / "model-generator.safetensors"))
    launch(4)  # same run folder: resumes at step 2
    last = checkpoint.latest(run_dir)
    assert last.name == "step-00000004"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss_fake" in x]
    assert steps == [1, 2, 3, 4]
    gen_after = load_file(str(last / "model-generator.safetensors"))
    assert any(not torch.equal(gen_before[k], gen_after[k]) for k in gen_before)


def test_msd_smaller_students_with_tsm_are_routed_and_served(tmp_path, tiny_sd):
    from pipelines import generation, msd as msd_serving, registry
    from training.config import MsdConfig
    from training.methods import msd

    cfg = MsdConfig(teacher=str(tiny_sd), run_dir=str(tmp_path / "run"), prompts="shapes", steps=1, batch_size=2,
                    height=64, width=64, ratio=1, warmup=1, lr=1e-3, width_mult=0.5, tsm_steps=2,
                    groups=(("single_object", "colors", "two_object"), ("counting", "position", "color_attr")))
    res = msd.train(cfg)
    assert res["finished"] and res["students"] == 2
    out = msd.export(res, tmp_path / "msd-model")
    meta = msd_serving.read(out)
    assert meta["router"]["type"] == "category"
    small = registry.get(str(out / "student-0"))
    assert small.role == "student"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "student-1" / "unet")
    assert list(unet.config.block_out_channels) == [4, 8]  # half of the teacher's (8, 16)
    assert msd_serving.route(meta["router"], ["a red circle", "two blue stars", "a photo of a cat"]) == [0, 1, 0]
    a = generation.generate(str(out), "two blue stars", height=64, width=64)
    assert a.settings["student"] == 1 and a.images[0].size == (64, 64)
    assert registry.get(str(out)).id == str(out)
    # the copied students borrow the teacher's components from their new place
    for student in ("student-0", "student-1"):
        assert not (out / student / "vae").exists()
        assert registry.component_folder(out / student, "vae") == (tiny_sd / "vae").resolve()


def test_msd_lora_students_on_a_trained_student_store_their_adapters_alone(tmp_path, tiny_sd, tiny_student):
    """MSD's `student_init` variant: each student is a LoRA on one trained student's UNet, saved as diffusers'
    LoRA file beside an onestep.json that borrows that UNet; loading fuses it back to the trained generator."""
    from pipelines import generation, loading, registry
    from training.config import MsdConfig
    from training.methods import msd

    cfg = MsdConfig(teacher=str(tiny_sd), run_dir=str(tmp_path / "run"), prompts="shapes", steps=3, batch_size=2,
                    height=64, width=64, ratio=1, warmup=1, lr=1e-2, student_init=str(tiny_student),
                    generator_lora_rank=4, lora_alpha=4.0, fake_warmup=1, gan_weight=1e-3, data_size=32,
                    groups=(("single_object", "colors", "two_object"), ("counting", "position", "color_attr")))
    res = msd.train(cfg)
    assert res["finished"] and res["students"] == 2
    # the GAN pool's latents were encoded once, for both students
    assert (tmp_path / "run" / "latents.safetensors").is_file()
    assert not any((tmp_path / "run" / f"student-{i}" / "latents.safetensors").exists() for i in (0, 1))
    out = msd.export(res, tmp_path / "msd-model")
    base = loading.load_pipeline(str(tiny_student), device="cpu", dtype=torch.float32, cache=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base.unet(x, 999, encoder_hidden_states=emb).sample
    for i in (0, 1):
        folder = out / f"student-{i}"
        assert not (folder / "unet").exists() and (folder / registry.LORA_FILE).stat().st_size < 200_000
        assert registry.component_folder(folder, "unet") == (tiny_student / "unet").resolve()
        pipe = loading.load_pipeline(str(folder), device="cpu", dtype=torch.float32, cache=False)
        with torch.no_grad():
            fused = pipe.unet(x, 999, encoder_hidden_states=emb).sample
        assert not torch.allclose(fused, plain, atol=1e-4)  # the LoRA trained
        assert loading.weights_fingerprint(folder) != loading.weights_fingerprint(tiny_student)
    # the last student's trained generator (LoRA unfused, from its run's checkpoint) gives what its folder gives
    from training import checkpoint
    from training.methods import dmd2

    generator = dmd2.build_generator(msd.student_config(cfg, 1), base.unet)
    generator.load_state_dict(loading.load_state_dict(checkpoint.latest(tmp_path / "run" / "student-1")
                                                      / "model-generator.safetensors"))
    with torch.no_grad():
        live = generator(x, 999, encoder_hidden_states=emb).sample
    # fused weights round differently from the unfused LoRA (by up to ~2e-4 with 2 threads on an AVX-512
    # CPU); the LoRA's own effect is far larger than that tolerance
    assert torch.allclose(live, fused, atol=1e-3) and (fused - plain).abs().max() > 1e-2
    a = generation.generate(str(out), "two blue stars", height=64, width=64)  # counting: the second student
    assert a.settings["student"] == 1 and a.images[0].size == (64, 64)
    # ReNO and the CLI take the routed student's folder
    assert generation.routed(str(out), "two blue stars") == (str(out / "student-1"), 1)
    assert generation.routed(str(tiny_student), "two blue stars") == (str(tiny_student), None)


def test_student_borrows_what_it_shares_with_its_local_teacher(tiny_student, tiny_sd, copy_model):
    """A student saved from a local teacher stores its UNet and scheduler only; loading takes the VAE,
    text encoder and tokenizer from the teacher, and the weights fingerprint covers them."""
    from pipelines import loading, registry

    assert sorted(p.name for p in tiny_student.iterdir() if p.is_dir()) == ["scheduler", "unet"]
    assert registry.component_folder(tiny_student, "text_encoder") == (tiny_sd / "text_encoder").resolve()
    pipe = loading.load_pipeline(str(tiny_student), device="cpu", dtype=torch.float32, cache=False)
    teacher = loading.load_pipeline(str(tiny_sd), device="cpu", dtype=torch.float32, cache=False)
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert pipe.tokenizer("a red circle").input_ids == teacher.tokenizer("a red circle").input_ids
    assert registry._native_size(tiny_student) == registry._native_size(tiny_sd)  # read through the borrowed VAE

    # a changed teacher VAE changes the student's fingerprint (an ONNX export of it goes stale)
    from training.methods.dmd2 import copy_folder, share_components

    teacher_copy = copy_model(tiny_sd)
    student_copy = copy_folder(tiny_student, teacher_copy.parent / "student")
    share_components(student_copy, teacher_copy)
    before = loading.weights_fingerprint(student_copy)
    config = teacher_copy / "vae" / "config.json"
    config.write_text(config.read_text().replace("{", '{"_note": "changed",', 1))
    assert loading.weights_fingerprint(student_copy) != before


def test_embedding_router_splits_prompts_into_quadrants(tiny_sd):
    from pipelines import loading, msd as msd_serving

    pipe = loading.load_pipeline(str(tiny_sd))
    prompts = ["a red circle", "a blue square", "a photo of a cat", "a green dog", "a cat and a dog",
               "a red square on a blue background", "a photo of a dog", "a green circle"]
    router = msd_serving.fit_embedding_router(pipe, prompts, 4)
    routes = msd_serving.route(router, prompts, pipe=pipe)
    assert all(0 <= r < 4 for r in routes) and len(set(routes)) >= 2
    assert msd_serving.route(router, prompts, pipe=pipe) == routes  # deterministic


def test_nasa_t_student_steers_with_nasa_and_teacher_cfg_leaves_the_negative(tmp_path, tiny_sd, prompt_file,
                                                                            monkeypatch):
    from pipelines import nasa
    from shapes import COLORS
    from training.methods import dmd2

    source = dmd2.NegativeSource("colors", 0)
    prompts = ["a red circle left of a blue square", "a circle", "two green stars on a white background"]
    for _ in range(20):
        for p, neg in zip(prompts, source.sample(prompts)):
            assert neg in COLORS and neg not in p.split()
    alphas, negatives, real = [], [], []
    applied = nasa.applied

    def spy_applied(model, embeds, alpha, *a, **kw):
        alphas.append(alpha)
        negatives.append(embeds.clone())
        return applied(model, embeds, alpha, *a, **kw)

    real_x0 = dmd2.Distiller.real_x0

    def spy_real(self, x_t, t, cond, uncond):
        real.append(uncond.prompt_embeds.clone())
        return real_x0(self, x_t, t, cond, uncond)

    monkeypatch.setattr(dmd2.nasa, "applied", spy_applied)
    monkeypatch.setattr(dmd2.Distiller, "real_x0", spy_real)
    cfg = _cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives="colors", nasa_prob=1.0, nasa_alpha_max=0.8, steps=2)
    res = dmd2.train(cfg)
    assert res["finished"] and len(alphas) == 2 and all(0 < a <= 0.8 for a in alphas)
    # the teacher's CFG extrapolated from the same negatives the student steered away from (not from "")
    assert len(real) == 2 and all(torch.equal(r, n) for r, n in zip(real, negatives))
    assert 0 < res["nasa_alpha"] <= 0.8
    gen = res["distiller"].generator
    assert not any(isinstance(m.processor, nasa.NASAAttnProcessor) for m in nasa.cross_attention_layers(gen))
    # with a teacher-side template the teacher's negative names more than the student's NASA negative
    from pipelines import onestep

    alphas.clear(), negatives.clear(), real.clear()
    said = []
    encode = onestep.encode_prompt
    monkeypatch.setattr(dmd2.onestep, "encode_prompt", lambda pipe, texts, *a: said.append(list(texts)) or
                        encode(pipe, texts, *a))
    dmd2.train(_cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives="colors", nasa_prob=1.0, steps=1,
                    nasa_teacher_negative="{0}, on a {0} background", run_dir=str(tmp_path / "run-template")))
    student_neg = next(t for t in said if all(x in COLORS for x in t))
    assert [f"{c}, on a {c} background" for c in student_neg] in said
    assert len(real) == 1 and not torch.equal(real[0], negatives[0])
    with pytest.raises(ValueError, match="nasa_teacher_negative"):
        dmd2.train(_cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives="colors", nasa_teacher_negative="{1}"))
    with pytest.raises(ValueError, match="nasa_prob 2"):
        dmd2.train(_cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives="colors", nasa_prob=2.0))
    with pytest.raises(ValueError, match="neither 'colors' nor a text file"):
        dmd2.train(_cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match="allowed: 0 to"):
        dmd2.train(_cfg(tmp_path, tiny_sd, prompt_file, nasa_negatives="colors", nasa_alpha_max=17.0))
