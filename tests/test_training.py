"""Training layer: configs, atomic checkpoints, and a few real steps of each method with resume."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training.config import ClipConfig, TeacherConfig, VaeConfig, from_dict, with_overrides


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))


def _metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in line]


def test_config_rejects_unknown_keys_and_bad_overrides():
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict({"method": "clip", "stepz": 3})
    with pytest.raises(ValueError, match="unknown method"):
        from_dict({"method": "nope"})
    with pytest.raises(ValueError, match="bad override"):
        with_overrides(ClipConfig(), ["nokey=1"])
    cfg = with_overrides(VaeConfig(), ["steps=7", "block_out_channels=[16, 32]"])
    assert cfg.steps == 7 and cfg.block_out_channels == (16, 32)


def test_lr_schedule_warms_up_holds_until_decay_start_then_decays():
    from training.common import lr_factor
    from training.config import Dmd2Config

    cfg = Dmd2Config(warmup=10, steps=200, decay_start=100, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == 1.0
    assert lr_factor(cfg, 99) == 1.0 and lr_factor(cfg, 150) == pytest.approx(0.55)
    assert lr_factor(cfg, 200) == pytest.approx(0.1) and lr_factor(cfg, 500) == pytest.approx(0.1)
    plain = Dmd2Config(warmup=10, steps=110, min_lr_ratio=0.1)  # no decay_start: the decay starts after warm-up
    assert lr_factor(plain, 60) == pytest.approx(0.55)
    # a warm start (a fresh optimizer at step 1,000) warms up again before holding and decaying
    warm = Dmd2Config(warmup=10, steps=1200, decay_start=1100, min_lr_ratio=0.1, init_step=1000)
    assert lr_factor(warm, 1000) == pytest.approx(0.1) and lr_factor(warm, 1009) == 1.0
    assert lr_factor(warm, 1099) == 1.0 and lr_factor(warm, 1150) == pytest.approx(0.55)
    # after its ramp, a warm start follows the schedule a run from step 0 would (a resume sees the same LR)
    cold = Dmd2Config(warmup=10, steps=1200, min_lr_ratio=0.1)
    assert lr_factor(cold, 1100) < 1.0
    assert lr_factor(dataclasses.replace(cold, init_step=1000), 1100) == pytest.approx(lr_factor(cold, 1100))


def test_checkpoint_is_atomic_rotates_and_skips_incomplete(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"m": model}, {"m": opt}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    half = tmp_path / "checkpoints" / "step-00000009"
    half.mkdir()
    (half / "model-m.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.load(half, {"m": model})
    fresh, fresh_opt = torch.nn.Linear(3, 2), None
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = checkpoint.load(checkpoint.latest(tmp_path), {"m": fresh}, {"m": fresh_opt})
    assert state["step"] == 3 and torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def _train_twice(train, cfg, run_dir):
    first = train(cfg)
    assert first["finished"] and first["step"] == 2
    saved = checkpoint.latest(run_dir)
    second = train(with_overrides(cfg, ["steps=4"]))
    assert second["finished"] and second["step"] == 4
    assert _metric_steps(run_dir) == [1, 2, 3, 4]  # resumed at 3, not restarted
    assert saved.name == "step-00000002" and checkpoint.latest(run_dir).name == "step-00000004"
    return second


def test_clip_trains_and_resumes(tmp_path):
    from training.methods import clip

    clip.build_tokenizer(tmp_path / "tok")
    cfg = ClipConfig(run_dir=str(tmp_path / "run"), tokenizer_dir=str(tmp_path / "tok"), steps=2, batch_size=8,
                     hidden_size=32, layers=1, heads=2, data_size=32, save_every=2, log_every=1, warmup=1)
    res = _train_twice(clip.train, cfg, tmp_path / "run")
    top1 = clip.retrieval_top1(res["model"], res["tokenizer"], *clip_pool(), group=8)
    assert 0.0 <= top1["exact"] <= top1["satisfying"] <= 1.0
    clip.export(res["model"], res["tokenizer"], tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    # continuing with a new image tower keeps the text tower the UNets are conditioned on
    from transformers import CLIPModel

    cont = clip.train(with_overrides(cfg, [f"init_from={tmp_path / 'clip'}", "freeze_text=true", "patch_size=16",
                                           f"run_dir={tmp_path / 'run2'}", "steps=1"]))
    old = CLIPModel.from_pretrained(tmp_path / "clip")
    new = cont["model"]
    assert all(torch.equal(a, b) for a, b in zip(old.text_model.state_dict().values(), new.text_model.state_dict().values()))
    assert new.config.vision_config.patch_size == 16
    # a text tower the teacher moved (text_from) replaces the CLIP's, over a resumed checkpoint's too
    from training.methods.teacher import text_encoder_from_clip

    moved = text_encoder_from_clip(old)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    moved.save_pretrained(tmp_path / "moved")
    aligned = with_overrides(cfg, [f"init_from={tmp_path / 'clip'}", "freeze_text=true",
                                   f"text_from={tmp_path / 'moved'}", f"run_dir={tmp_path / 'run3'}", "steps=1",
                                   "save_every=1"])
    for steps in (1, 2):  # the second run resumes the first's checkpoint
        tower = clip.train(dataclasses.replace(aligned, steps=steps))["model"].text_model
        assert all(torch.equal(a, b) for a, b in zip(getattr(moved, "text_model", moved).state_dict().values(),
                                                      tower.state_dict().values()))


def clip_pool():
    from training.data import make_pool

    return make_pool(16, seed=3)


def test_vae_trains_and_resumes(tmp_path):
    from training.methods import vae

    cfg = VaeConfig(run_dir=str(tmp_path / "run"), steps=2, batch_size=4, block_out_channels=(16, 16, 16),
                    data_size=16, save_every=2, log_every=1, warmup=1)
    res = _train_twice(vae.train, cfg, tmp_path / "run")
    assert res["psnr"] > 0 and res["scaling_factor"] > 0
    assert res["model"].config.scaling_factor == pytest.approx(res["scaling_factor"])
    # decoder-only fine-tuning (edge-weighted) keeps the encoder, so latents stay valid for the UNets
    vae.export(res["model"], tmp_path / "vae")
    tuned = vae.train(with_overrides(cfg, [f"init_from={tmp_path / 'vae'}", "decoder_only=true", "edge_weight=4",
                                           f"run_dir={tmp_path / 'run2'}", "steps=1"]))["model"]
    old = res["model"]
    assert all(torch.equal(a, b) for a, b in zip(old.encoder.state_dict().values(), tuned.encoder.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(old.decoder.state_dict().values(), tuned.decoder.state_dict().values()))
    assert tuned.config.scaling_factor == pytest.approx(old.config.scaling_factor)


def test_teacher_trains_resumes_and_exports_a_standard_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from training.methods import clip, teacher, vae

    clip.build_tokenizer(tmp_path / "tok")
    c = clip.train(ClipConfig(run_dir=str(tmp_path / "clip-run"), tokenizer_dir=str(tmp_path / "tok"), steps=1,
                              batch_size=4, hidden_size=32, layers=1, heads=2, data_size=16, warmup=1))
    clip.export(c["model"], c["tokenizer"], tmp_path / "clip")
    v = vae.train(VaeConfig(run_dir=str(tmp_path / "vae-run"), steps=1, batch_size=2,
                            block_out_channels=(16, 16, 16), data_size=16, warmup=1))
    vae.export(v["model"], tmp_path / "vae")
    cfg = TeacherConfig(run_dir=str(tmp_path / "run"), clip_dir=str(tmp_path / "clip"), vae_dir=str(tmp_path / "vae"),
                        steps=2, batch_size=4, block_out_channels=(16, 32, 32), data_size=16, save_every=2,
                        log_every=1, warmup=1, eval_images=8, snr_shift=16.0, cross_attention_levels=3)
    res = _train_twice(teacher.train, cfg, tmp_path / "run")
    assert res["unet"].config.down_block_types == ("CrossAttnDownBlock2D",) * 3  # attention at 16x16 too
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()
    teacher.export(res["unet"], res["vae"], res["text_encoder"], res["tokenizer"], tmp_path / "teacher",
                   res["snr_shift"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "teacher")
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    shifted = teacher.sampling_scheduler(16.0).alphas_cumprod
    assert torch.allclose(pipe.scheduler.alphas_cumprod, shifted, atol=1e-6)  # the schedule it trained on
    # given by path, the folder is served as the multi-step teacher it is (not as a one-step student)
    from pipelines import registry

    spec = registry.get(str(tmp_path / "teacher"))
    assert (spec.role, spec.steps, spec.guidance_scale, spec.guidance_rescale) == ("teacher", 25, 5.0, 0.7)
    with pytest.raises(ValueError, match="cross_attention_levels"):
        teacher.build_unet(dataclasses.replace(cfg, cross_attention_levels=4), 32, 8)
    # a later phase trains the text encoder too: it resumes the frozen phase's checkpoint (which has no text
    # encoder), moves the text encoder, and its own checkpoint resumes with it
    joint = dataclasses.replace(cfg, steps=5, text_lr=1e-2, eval_images=0)
    trained = teacher.train(joint)
    assert trained["step"] == 5
    assert any(not torch.equal(a, b) for a, b in zip(pipe.text_encoder.state_dict().values(),
                                                      trained["text_encoder"].state_dict().values()))
    again = teacher.train(dataclasses.replace(joint, steps=6))
    assert again["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "model-text_ema.safetensors").is_file()


def test_snr_shift_multiplies_every_snr_keeps_zero_terminal_snr_and_survives_saving(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler

    from training.methods import teacher

    def snr(sched):
        ac = sched.alphas_cumprod.double()
        return ac / (1 - ac)

    base, shifted = DDPMScheduler(**teacher.schedule()), DDPMScheduler(**teacher.schedule(16.0))
    ratio = snr(shifted)[:-1] / snr(base)[:-1]
    assert torch.allclose(ratio, torch.full_like(ratio, 16.0), rtol=1e-3)
    assert float(shifted.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-9)  # still zero terminal SNR
    teacher.sampling_scheduler(16.0).save_pretrained(tmp_path / "scheduler")
    loaded = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    assert torch.allclose(loaded.alphas_cumprod, shifted.alphas_cumprod, atol=1e-6)
    assert teacher.schedule() == teacher.SCHEDULE  # no shift: the stored schedule stays the plain one


def test_recipe_builds_the_family_from_nothing_and_resumes(tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline
    from transformers import CLIPModel

    from training.recipes import shapes as recipe

    tiny = ["clip.steps=1", "clip.batch_size=4", "clip.hidden_size=32", "clip.layers=1", "clip.heads=2",
            "clip.data_size=16", "vae.steps=1", "vae.batch_size=2", "vae.block_out_channels=[16,16,16]",
            "vae.data_size=16", "vae_decoder.steps=1", "vae_decoder.batch_size=2", "vae_decoder.data_size=16",
            "teacher.steps=1", "teacher.batch_size=2", "teacher.block_out_channels=[16,32,32]",
            "teacher.data_size=16", "teacher.eval_images=0"]
    args = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")] + [a for t in tiny for a in ("--set", t)]
    assert recipe.main(args + ["--stages", "tokenizer,clip,vae"]) == 0
    before = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
    encoder, decoder = before.encoder.state_dict(), before.decoder.state_dict()
    assert recipe.main(args + ["--stages", "vae_decoder,teacher"]) == 0
    tuned = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")  # the decoder moved, the encoder did not
    assert all(torch.equal(v, tuned.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not all(torch.equal(v, tuned.decoder.state_dict()[k]) for k, v in decoder.items())
    import shutil

    shutil.rmtree(tmp_path / "work" / "vae_decoder")  # a fresh machine: the recorded step, not a second fine-tune
    assert recipe.main(args + ["--stages", "vae_decoder"]) == 0
    assert _metric_steps(tmp_path / "work" / "vae_decoder") == []
    again = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").decoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in tuned.decoder.state_dict().items())
    record = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert set(record) == {"tokenizer", "clip", "vae", "vae_decoder", "teacher"}
    assert all(r["wall_seconds"] >= 0 and r["finished"] for r in record.values())
    assert DiffusionPipeline.from_pretrained(tmp_path / "out" / "teacher").unet.config.in_channels == 8
    # a second run resumes every stage at its last step instead of training again
    assert recipe.main(args + ["--stages", "teacher", "--set", "teacher.steps=2"]) == 0
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["teacher"]["step"] == 2
    # a fresh machine (no run folder): the teacher warm-starts from its export at the recorded step
    shutil.rmtree(tmp_path / "work" / "teacher")
    assert recipe.main(args + ["--stages", "teacher", "--set", "teacher.steps=3"]) == 0
    assert _metric_steps(tmp_path / "work" / "teacher") == [3]
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["teacher"]["step"] == 3
    # so does a student stage stopped early: its generator from the committed partial export
    student = [a for t in ("student.steps=2", "student.batch_size=2", "student.data_size=8", "student.eval_images=0")
               for a in ("--set", t)] + ["--stages", "student"]
    assert recipe.main(args + student + ["--set", "student.max_seconds=0.001", "--export-partial"]) == 3  # stopped
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["student"]["step"] == 1
    shutil.rmtree(tmp_path / "work" / "student")
    assert recipe.main(args + student) == 0
    assert _metric_steps(tmp_path / "work" / "student") == [2]
    # the CLIP image tower's phases resume one run (the text tower stays the teacher's), then a fresh
    # machine continues the exported tower from its recorded step instead of training it again
    vision = [a for t in ("steps=2", "batch_size=4", "hidden_size=32", "layers=1", "heads=2", "data_size=16",
                          "warmup=1", "log_every=1") for a in ("--set", f"clip_vision.{t}")] + ["--stages", "clip_vision"]
    text_before = CLIPModel.from_pretrained(tmp_path / "out" / "clip").text_model.state_dict()
    assert recipe.main(args + vision) == 0
    assert _metric_steps(tmp_path / "work" / "clip_vision") == [1, 2]
    exported = CLIPModel.from_pretrained(tmp_path / "out" / "clip")
    assert exported.config.vision_config.patch_size == 4
    assert all(torch.equal(v, exported.text_model.state_dict()[k]) for k, v in text_before.items())
    assert "retrieval_top1_of_100_exact" in json.loads((tmp_path / "out" / "recipe.json").read_text())["clip_vision"]
    shutil.rmtree(tmp_path / "work" / "clip_vision")
    assert recipe.main(args + vision) == 0
    assert _metric_steps(tmp_path / "work" / "clip_vision") == []
    with pytest.raises(SystemExit):
        recipe.main(args + ["--stages", "nope"])


def test_teacher_probe_runs_variants_side_by_side_and_rejects_bad_ones(tmp_path):
    import subprocess
    import sys

    from training.recipes import probe

    small = "data_size=16,batch_size=4,warmup=1,log_every=1"
    cmd = [sys.executable, "-m", "training.recipes.probe", "--out", "assets/models/shapes-64", "--work",
           str(tmp_path), "--seconds", "2", "--prompts", "2", "--threads", "1", "--export", str(tmp_path / "exp"),
           "--variant", f"base:{small},block_out_channels=[16,32,32]",
           "--variant", f"warm16:{small},snr_shift=16,init=teacher"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "probe.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "warm16"]
    for r in rows:
        assert r["steps"] >= 1 and 0 <= r["shapeeval"] <= 1 and 0 <= r["restore_snr1"] <= 1
        assert 0 <= r["shape_follow"] <= 1
    assert rows[1]["settings"]["snr_shift"] == 16 and "init_unet" in rows[1]["settings"]
    assert rows[1]["settings"]["init_text_encoder"].endswith("text_encoder")
    assert rows[0]["restore_strength"] < rows[1]["restore_strength"]  # SNR 1 comes later in the shifted schedule
    assert rows[0]["settings"]["block_out_channels"] == [16, 32, 32]  # a list value keeps its commas
    from pipelines import registry

    for name in ("base", "warm16"):  # each variant exported as a teacher folder the registry serves by path
        assert registry.get(str(tmp_path / "exp" / name)).role == "teacher"
    with pytest.raises(ValueError, match="bad variant setting"):
        probe.parse_variant("x:not_a_key=1")
    with pytest.raises(ValueError, match="only warm start"):
        probe.parse_variant("x:init=elsewhere")
