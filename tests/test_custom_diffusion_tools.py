"""Custom Diffusion tools: retrieval client, real prior, merge, compression, eval and the CLI."""

from __future__ import annotations

import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from custom_diffusion_helpers import cd_config, write_concept
from difftune.api import train_custom_diffusion
from difftune.cli import main
from difftune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def knn_server():
    """A local stand-in for a clip-retrieval back-end: POST /knn-service, images under /img/."""
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            host = f"http://127.0.0.1:{self.server.server_port}"
            results = [{"url": f"{host}/img/dead.png", "caption": "gone", "similarity": 0.9}]
            results += [{"url": f"{host}/img/not-an-image.png", "caption": "html", "similarity": 0.9}]
            results += [{"url": f"{host}/img/{i}.png", "caption": f"a {body['text']} number {i}",
                         "similarity": 0.8, "id": i} for i in range(body["num_images"])]
            data = json.dumps(results).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.endswith("dead.png"):
                self.send_error(404)
                return
            data = b"<html>nope</html>" if "not-an-image" in self.path else png.getvalue()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/knn-service", seen
    server.shutdown()


def test_retrieve_writes_the_real_prior_layout(knn_server, tmp_path, capsys):
    from difftune.custom_diffusion.concepts import real_prior_pairs

    url, seen = knn_server
    out = tmp_path / "real"
    assert main(["retrieve", "--class_prompt", "cat", "--class_data_dir", str(out), "--num_class_images", "5",
                 "--backend", url]) == 0
    assert seen[-1]["text"] == "cat" and seen[-1]["num_images"] == 7 and seen[-1]["modality"] == "image"
    lines = {n: (out / n).read_text().splitlines() for n in ("images.txt", "caption.txt", "urls.txt")}
    assert all(len(v) == 5 for v in lines.values())
    assert lines["caption.txt"][0] == "a cat number 0" and "dead" not in "".join(lines["urls.txt"])
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.jpg" for i in range(5)]
    pairs = real_prior_pairs(out)
    assert len(pairs) == 5 and pairs[2][1] == "a cat number 2"


def test_real_prior_folder_names_the_images_it_leaves_out(tmp_path, caplog):
    from PIL import Image

    from difftune.custom_diffusion.concepts import real_prior_pairs

    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a cat\n")
    assert real_prior_pairs(tmp_path) == [(tmp_path / "a.png", "a cat")]
    assert "1 image(s)" in caplog.text and "b.png" in caplog.text


def test_unreachable_backend_is_a_clear_error(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["retrieve", "--class_prompt", "cat", "--class_data_dir", str(tmp_path / "r"),
                 "--backend", f"http://127.0.0.1:{port}/knn-service", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be reached" in err and "clip-retrieval back" in err
    assert not (tmp_path / "r").exists()  # (it left an empty r/images/)
    # the seed's command, without a back-end: why there is none, and the two ways on
    code = main(["retrieve", "--class_prompt", "cat", "--class_data_dir", str(tmp_path / "r2"),
                 "--num_class_images", "200"])
    err = capsys.readouterr().err
    assert code == 2 and "--backend" in err and "no longer online" in err and "--real_prior" in err
    assert not (tmp_path / "r2").exists()
    code = main(["retrieve", "--class_prompt", "cat", "--class_data_dir", str(tmp_path / "r3"), "--backend", "notaurl"])
    err = capsys.readouterr().err  # not urllib's ValueError traceback, and no empty folder left behind
    assert code == 2 and "'notaurl' is not an http(s) URL" in err and not (tmp_path / "r3").exists()


def test_real_prior_from_a_captioned_folder_trains(tiny_model_dir, tmp_path):
    star = write_concept(tmp_path / "star")
    prior = tmp_path / "prior"
    prior.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 64), (i * 60, 100, 100)).save(prior / f"p{i}.png")
        (prior / f"p{i}.txt").write_text(f"a star number {i}\n")
    settings = dict(instance_data_dir=str(star), instance_prompt="<new1> star", with_prior_preservation=True,
                    real_prior=True, class_data_dir=str(prior), scale_lr=True)
    with pytest.raises(DataError, match=r"holds 3 real class image\(s\), fewer than --num_class_images 200.*"
                                        r"--num_class_images 3"):  # not a silent prior of 3 where 200 were asked
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "short", **settings))
    with pytest.raises(ConfigError, match=r"--class_data_dir .*star is the concept's instance_data_dir: its photos "
                                          r"would count as class images"):  # the prior would be the concept itself
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "same", **dict(settings, class_data_dir=str(star))))
    with pytest.raises(DataError, match=r"--real_prior: --class_data_dir .*nowhere does not exist\. Retrieve"):
        train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "gone",
                                         **dict(settings, class_data_dir=str(tmp_path / "nowhere"))))
    summary = train_custom_diffusion(cd_config(tiny_model_dir, tmp_path / "run", num_class_images=3, **settings))
    assert np.isfinite(summary["final_loss"])
    cfg = json.loads((tmp_path / "run" / "difftune_config.json").read_text())
    assert cfg["optim"]["learning_rate"] == 1e-3  # stored unscaled; the loop scales (x2 x batch 2)
    assert summary["learning_rate"] == 4e-3  # the card states the rate used, and where it came from
    assert "learning rate 0.004 (--learning_rate 0.001 scaled by --scale_lr)" in (tmp_path / "run" / "README.md").read_text()


@pytest.fixture(scope="module")
def two_concepts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    outs = []
    for shape, colour in (("star", (255, 215, 0)), ("heart", (220, 20, 60))):
        d = write_concept(root / shape, shape, colour)
        out = root / f"run-{shape}"
        train_custom_diffusion(cd_config(tiny_model_dir, out, instance_data_dir=str(d),
                                         instance_prompt=f"<new1> {shape}", max_train_steps=3, learning_rate=3e-2))
        outs.append(out)
    return outs


def test_merge_keeps_both_concepts_and_loads(tiny_model_dir, two_concepts, tmp_path):
    from difftune.api import generate

    out = tmp_path / "merged"
    assert main(["custom-diffusion", "merge", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 "--concepts", *map(str, two_concepts), "--output_dir", str(out)]) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["tokens"] == ["<new1>", "<new2>"]  # the second concept's <new1> was renamed, and it says so
    assert info["renamed"] == {str(two_concepts[1]): {"<new1>": "<new2>"}}
    assert max(info["constraint_relative_error"].values()) < 1e-3
    meta = json.loads((out / "custom_diffusion.json").read_text())
    assert [c["instance_prompt"] for c in meta["concepts"]] == ["<new1> star", "<new2> heart"]
    assert meta["prediction_type"] == "epsilon"  # (what both trained with: the merged folder samples with it)
    images = generate(str(tiny_model_dir), None, None, "<new1> star and <new2> heart", num_inference_steps=2,
                      custom_diffusion=out)
    assert images[0].size == (64, 64)
    from difftune.api import warn_unknown_tokens  # a token the folder does not define is named

    assert warn_unknown_tokens(["<new1> star", "<new3> heart"], info["tokens"], out) == ["<new3>"]
    assert warn_unknown_tokens("<new1> star and <new2> heart", info["tokens"], out) == []


def test_compress_rank_trades_size_for_error(tiny_model_dir, two_concepts, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from difftune.custom_diffusion.compress import LOWRANK

    errors = []
    for rank in (1, 4):
        out = tmp_path / f"r{rank}"
        # no --pretrained_model_name_or_path: the base the concept was trained on (not the built-in default)
        assert main(["custom-diffusion", "compress", "--custom_diffusion", str(two_concepts[0]), "--rank", str(rank),
                     "--output_dir", str(out)]) == 0
        said = capsys.readouterr()
        assert f"base model: {tiny_model_dir} (recorded in" in said.err
        info = json.loads(said.out)
        assert info["parameters_lowrank"] < info["parameters_full"]
        errors.append(info["relative_delta_error"])
    assert errors[1] < errors[0] < 1.0
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.unet.load_attn_procs(str(tmp_path / "r4"), weight_name="pytorch_custom_diffusion_weights.safetensors",
                              _pipeline=pipe)
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--custom_diffusion",
                 str(tmp_path / "r4"), "--weight_name", LOWRANK, "--prompt", "<new1> star",
                 "--num_inference_steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (64, 64)


def test_merge_and_compress_never_write_over_a_folder(tiny_model_dir, two_concepts, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in two_concepts[0].iterdir() if p.is_file()}
    assert main(["custom-diffusion", "merge", "--concepts", *map(str, two_concepts),
                 "--output_dir", str(two_concepts[0])]) == 2  # the output would replace an input's weights
    assert f"is the --concepts folder {two_concepts[0]}" in capsys.readouterr().err
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(two_concepts[0]), "--rank", "1",
                 "--output_dir", str(two_concepts[0]), "--overwrite"]) == 2  # not even with --overwrite
    assert "is the --custom_diffusion folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in two_concepts[0].iterdir() if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    args = ["custom-diffusion", "compress", "--custom_diffusion", str(two_concepts[0]), "--rank", "1",
            "--output_dir", str(other)]
    assert main(args) == 2
    assert f"--output_dir {other} already exists and is not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (other / "pytorch_custom_diffusion_weights.safetensors").is_file()
    # --overwrite never replaces a folder holding an input (a run whose checkpoint is compressed) or a base model
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(two_concepts[0]), "--rank", "1",
                 "--output_dir", str(two_concepts[0].parent), "--overwrite"]) == 2
    assert f"holds {two_concepts[0]}, which this command reads" in capsys.readouterr().err
    assert main([*args[:-1], str(tiny_model_dir), "--overwrite"]) == 2
    assert "holds a base model (model_index.json)" in capsys.readouterr().err
    assert (tiny_model_dir / "unet").is_dir()


def test_merge_refuses_concepts_of_other_bases(tiny_model_dir, two_concepts, tmp_path, capsys):
    """Concepts trained on two bases were merged on the first one's, silently; one whose text encoder has
    another width ended in a RuntimeError traceback."""
    import shutil

    import torch
    from safetensors.torch import save_file

    moved = tmp_path / "other-base"  # the record of another base (same architecture, other weights)
    shutil.copytree(two_concepts[1], moved)
    meta = json.loads((moved / "custom_diffusion.json").read_text())
    (moved / "custom_diffusion.json").write_text(json.dumps(dict(meta, base_model=str(tmp_path / "sd-variant"))))
    argv = ["custom-diffusion", "merge", "--concepts", str(two_concepts[0]), str(moved)]
    assert main([*argv, "--output_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--concepts were trained on different base models" in err and str(tmp_path / "sd-variant") in err
    assert not (tmp_path / "m").exists()
    shutil.copytree(tiny_model_dir, tmp_path / "sd-variant")  # named: merged on it, and recorded as its base
    assert main([*argv, "--pretrained_model_name_or_path", str(tmp_path / "sd-variant"),
                 "--output_dir", str(tmp_path / "m-on-variant")]) == 0
    merged = json.loads((tmp_path / "m-on-variant" / "custom_diffusion.json").read_text())
    assert merged["base_model"] == str((tmp_path / "sd-variant").resolve())  # (it said the first concept's)
    narrow = tmp_path / "narrow"  # a token embedding of another text encoder's width
    shutil.copytree(two_concepts[1], narrow)
    for token, file in meta["embeddings"].items():
        save_file({token: torch.zeros(7)}, str(narrow / file))
    assert main(["custom-diffusion", "merge", "--concepts", str(two_concepts[0]), str(narrow),
                 "--output_dir", str(tmp_path / "m2")]) == 2
    assert f"merge: {narrow} was trained on another base model (token embedding 7 values" in capsys.readouterr().err
    # a base of another UNet layout, named by the user: an AttributeError traceback in both tools
    for argv in (["merge", "--concepts", *map(str, two_concepts)], ["compress", "--custom_diffusion",
                                                                    str(two_concepts[0]), "--rank", "1"]):
        assert main(["custom-diffusion", *argv, "--pretrained_model_name_or_path", "tiny-shapes",
                     "--output_dir", str(tmp_path / "m3")]) == 2
        err = capsys.readouterr().err
        assert "another base model" in err and "Traceback" not in err, err[-500:]
    assert "matches no layer of this base's UNet" in err or "the base's layer" in err  # (compress: the weights)


def test_compress_writes_safetensors_from_a_bin_folder(tiny_model_dir, two_concepts, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tmp_path / "bin"  # the folder --no_safe_serialization writes: .bin weights and embeddings
    shutil.copytree(two_concepts[0], src)
    meta = json.loads((src / "custom_diffusion.json").read_text())
    for name in [meta["weight_name"], *meta["embeddings"].values()]:
        torch.save(load_file(str(src / name)), src / name.replace(".safetensors", ".bin"))
        (src / name).unlink()
    meta["weight_name"] = meta["weight_name"].replace(".safetensors", ".bin")
    meta["embeddings"] = {t: f"{t}.bin" for t in meta["embeddings"]}
    (src / "custom_diffusion.json").write_text(json.dumps(meta))
    out = tmp_path / "c"
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(src), "--rank", "2",
                 "--output_dir", str(out)]) == 0
    written = json.loads((out / "custom_diffusion.json").read_text())
    assert written["embeddings"] == {"<new1>": "<new1>.safetensors"} and not list(out.glob("*.bin"))
    assert torch.equal(load_file(str(out / "<new1>.safetensors"))["<new1>"],
                       load_file(str(two_concepts[0] / "<new1>.safetensors"))["<new1>"].float())


def test_a_concept_under_a_controlnets_control(tiny_model_dir, tiny_base, two_concepts, fill_dir, tmp_path):
    from diffusers import ControlNetModel

    controlnet = tmp_path / "controlnet"
    ControlNetModel.from_unet(tiny_base.unet).save_pretrained(controlnet)
    outline = str(fill_dir / "validation" / "conditioning_0.png")
    argv = ["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--controlnet", str(controlnet),
            "--image", outline, "--prompt", "<new1> star", "--num_inference_steps", "2", "--seed", "3"]
    assert main([*argv, "--custom_diffusion", str(two_concepts[0]), "--out", str(tmp_path / "both.png")]) == 0
    assert main([*argv, "--out", str(tmp_path / "controlnet-only.png")]) == 0
    both, alone = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("both", "controlnet-only"))
    assert both.shape == alone.shape == (64, 64, 3)
    assert np.abs(both.astype(int) - alone.astype(int)).max() > 0  # the concept's token and weights took part


def test_eval_command_reports_fidelity_and_drift(tiny_model_dir, two_concepts, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "custom-diffusion", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 "--custom_diffusion", str(two_concepts[0]), "--n", "2", "--num_inference_steps", "2",
                 "--out", str(out)]) == 0
    result = json.loads((out / "eval_custom_diffusion.json").read_text())
    r = result["concepts"]["<new1> star"]
    assert r["reference"]["kind"] == "star" and 0 <= r["fidelity"]["concept_ok"] <= 1
    assert r["class_drift_delta_e"] >= 0 and result["unrelated"]["drift_delta_e"] >= 0
    assert "clip" not in r and "accuracy_base" in result["unrelated"]  # shapes: read, no CLIP needed
    # what it was sampled with, and what each row of the grid is (the command line says it too)
    assert (result["num_inference_steps"], result["guidance_scale"], result["seed"]) == (2, 7.5, 0)
    assert result["grid_rows"][:2] == ["<new1> star: adapted on its token prompt",
                                       "<new1> star: base on the class prompt"]
    printed = capsys.readouterr().out
    assert "concept_ok" in printed and "rows, up to 8 images each: <new1> star: adapted" in printed
    from PIL import Image

    with Image.open(out / "eval_custom_diffusion.png") as grid:  # a row of 64 px images per entry of grid_rows
        assert len(result["grid_rows"]) * 64 <= grid.height < (len(result["grid_rows"]) + 1) * 64


def write_photo_concept(folder, n=4):
    """A concept that is no shapes-world picture: smooth colour fields, as textured as a photo."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        small = rng.integers(0, 255, size=(5, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tiny_model_dir, tmp_path_factory):
    """A CLIP model the size of a test, built from a config (random weights), with its processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **layers),
                         vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
              ).save_pretrained(out)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer).save_pretrained(out)
    return out


def test_clip_scores_are_cosine_similarities(tiny_clip_dir):
    from difftune.errors import ModelLoadError
    from difftune.eval.clip import ClipScorer

    clip = ClipScorer(str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    assert clip.paired_similarity(images, images) == pytest.approx(1.0, abs=1e-5)  # an image is itself
    assert clip.image_alignment(images, images) < 1.0  # ... but not every other one
    assert -1.0 <= clip.text_alignment(images, ["a cat", "a dog", "a car"]) <= 1.0
    with pytest.raises(ModelLoadError, match="--clip_model, give a CLIP model folder"):
        ClipScorer("nobody/no-such-clip")  # offline: a clear error naming the flag


def test_a_photo_concept_is_measured_with_clip_not_with_shape_readings(tiny_model_dir, tiny_clip_dir, tmp_path,
                                                                        capsys):
    photos = write_photo_concept(tmp_path / "photos")
    run = tmp_path / "run"
    train_custom_diffusion(cd_config(tiny_model_dir, run, instance_data_dir=str(photos),
                                     instance_prompt="a photo of <new1> star", max_train_steps=1))
    argv = ["eval", "custom-diffusion", "--custom_diffusion", str(run), "--n", "2", "--num_inference_steps", "1",
            "--out", str(tmp_path / "eval")]
    assert main(argv) == 2  # shape readings would be numbers about nothing: refused, with what to pass
    assert "not flat shapes on flat backgrounds" in capsys.readouterr().err
    assert main([*argv, "--clip_model", str(tiny_clip_dir)]) == 0
    result = json.loads((tmp_path / "eval" / "eval_custom_diffusion.json").read_text())
    (prompt, r), = result["concepts"].items()
    assert prompt == "<new1> star" and "fidelity" not in r
    assert set(r["clip"]) == {"image_alignment", "text_alignment", "baseline_image_alignment_base_on_class_prompt",
                              "class_similarity_base_vs_adapted"}
    assert all(-1.0 <= v <= 1.0 + 1e-6 for v in r["clip"].values())
    assert "accuracy_base" not in result["unrelated"] and "clip_similarity_base_vs_adapted" in result["unrelated"]
    assert "clip_image" in capsys.readouterr().out


def test_cli_trains_and_generate_needs_one_adapter(tiny_model_dir, tmp_path, capsys):
    star = write_concept(tmp_path / "star")
    out = tmp_path / "run"
    assert main(["train", "custom-diffusion", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 "--instance_data_dir", str(star), "--instance_prompt", "<new1> star", "--resolution", "64",
                 "--max_train_steps", "1", "--train_batch_size", "1", "--output_dir", str(out), "--seed", "0",
                 "--freeze_model", "crossattn", "--noaug"]) == 0
    saved = json.loads((out / "difftune_config.json").read_text())
    assert saved["train"]["tracker_project_name"] == "custom-diffusion" and saved["optim"]["learning_rate"] == 1e-5
    assert main(["generate", "--pretrained_model_name_or_path", str(tiny_model_dir), "--prompt", "x"]) == 2
    assert "generate needs --controlnet DIR (with --image), --custom_diffusion DIR, or both" in capsys.readouterr().err
    code = main(["train", "custom-diffusion", "--pretrained_model_name_or_path", str(tiny_model_dir),
                 "--instance_data_dir", str(star), "--instance_prompt", "a star", "--modifier_token", "<new1>",
                 "--output_dir", str(tmp_path / "x")])
    assert code == 2 and "contains none of the modifier tokens" in capsys.readouterr().err


def test_damaged_or_repeated_inputs_are_named_and_nothing_is_half_written(tiny_model_dir, two_concepts, tmp_path,
                                                                           capsys):
    import shutil

    from difftune.errors import ConfigError

    def damaged(name, damage):
        folder = tmp_path / name
        shutil.copytree(two_concepts[0], folder)
        damage(folder)
        return str(folder)

    weights = damaged("weights", lambda f: (f / "pytorch_custom_diffusion_weights.safetensors").write_bytes(b"12"))
    meta = damaged("meta", lambda f: (f / "custom_diffusion.json").write_text("{'not': json"))
    embedding = damaged("embedding", lambda f: (f / "<new1>.safetensors").unlink())
    cases = [
        (["generate", "--custom_diffusion", weights, "--prompt", "<new1> star", "--num_inference_steps", "1",
          "--out", str(tmp_path / "g.png")], "weights_file.*is not a readable safetensors file"),
        (["custom-diffusion", "compress", "--custom_diffusion", weights, "--rank", "1", "--output_dir",
          str(tmp_path / "c1")], "is not a readable safetensors file"),
        (["custom-diffusion", "merge", "--concepts", meta, str(two_concepts[1]), "--output_dir", str(tmp_path / "m1")],
         r"custom_diffusion.json is not valid JSON"),
        (["custom-diffusion", "compress", "--custom_diffusion", embedding, "--rank", "1", "--output_dir",
          str(tmp_path / "c2")], r"the embedding file\(s\) <new1>.safetensors \(token <new1>\) .* are missing"),
        (["custom-diffusion", "merge", "--concepts", str(two_concepts[0]), str(two_concepts[0]), "--output_dir",
          str(tmp_path / "m2")], "names .* twice"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(said.replace("weights_file", "weights"), err) and "Traceback" not in err, (argv, err)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("c1", "c2", "m1", "m2", ".c", ".m"))]
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main(["custom-diffusion", "merge", "--concepts", *map(str, two_concepts), "--regularization_prompts",
                 str(tmp_path / "blank.txt"), "--output_dir", str(tmp_path / "m3")]) == 2
    assert "regularization prompts are empty" in capsys.readouterr().err
    # a merged folder holds a model and no checkpoint: training there is refused, not a silent replacement
    merged = tmp_path / "merged"
    assert main(["custom-diffusion", "merge", "--concepts", *map(str, two_concepts), "--output_dir", str(merged)]) == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    concept = write_concept(tmp_path / "dots", "circle", (0, 200, 0))
    with pytest.raises(ConfigError, match="already holds a trained model .* --overwrite_output_dir"):
        train_custom_diffusion(cd_config(tiny_model_dir, merged, instance_data_dir=str(concept),
                                         instance_prompt="<new1> circle", max_train_steps=1))
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    train_custom_diffusion(cd_config(tiny_model_dir, merged, instance_data_dir=str(concept),
                                     instance_prompt="<new1> circle", max_train_steps=1, overwrite_output_dir=True))
    left = {p.name for p in merged.iterdir()}
    assert "merge_info.json" not in left and "<new2>.safetensors" not in left  # nothing of the merge stays


def test_default_regularization_captions_fit_the_base():
    """On a real model the default regularization was 200 tiny-shapes captions ('red circle with blue
    background'); tiny-shapes keeps its own world."""
    from difftune.custom_diffusion.merge import default_regularization_prompts

    everyday = default_regularization_prompts(["a cat"], shapes_world=False)
    shapes = default_regularization_prompts(["a cat"], shapes_world=True)
    assert len(everyday) == len(shapes) == 201 and everyday[-1] == shapes[-1] == "a cat"
    assert "a photo of a dog" in everyday and not any("background" in p for p in everyday)
    assert all(p.endswith("background") for p in shapes[:-1])


def test_a_runs_tokenizer_and_prediction_type_reach_the_commands_that_use_it(tiny_model_dir, tmp_path, capsys):
    """A run's --prediction_type was lost after training (generate sampled with the base scheduler's), and one
    trained with --tokenizer_name on a base without tokenizer/ could be used by no command."""
    import shutil

    base = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("tokenizer"))
    out = tmp_path / "run"
    train_custom_diffusion(cd_config(base, out, instance_data_dir=str(write_concept(tmp_path / "star")),
                                     instance_prompt="<new1> star", max_train_steps=1, prediction_type="v_prediction",
                                     tokenizer_name=str(tiny_model_dir / "tokenizer")))
    meta = json.loads((out / "custom_diffusion.json").read_text())
    assert (meta["prediction_type"], meta["tokenizer_name"]) == ("v_prediction", str(tiny_model_dir / "tokenizer"))
    card = (out / "README.md").read_text()
    assert 'from_config(pipe.scheduler.config, prediction_type="v_prediction")' in card  # the card samples as trained
    assert f"`difftune generate --custom_diffusion {out} " in card  # (on the recorded base, read as it was)
    capsys.readouterr()
    assert main(["generate", "--custom_diffusion", str(out), "--prompt", "<new1> star", "--num_inference_steps", "1",
                 "--out", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "prediction type: v_prediction (the adapter's run trained with it" in err and "tokenizer: " in err
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(out), "--rank", "1",
                 "--output_dir", str(tmp_path / "c")]) == 0
    compressed = json.loads((tmp_path / "c" / "custom_diffusion.json").read_text())
    assert (compressed["prediction_type"], compressed["tokenizer_name"]) == ("v_prediction", meta["tokenizer_name"])
    assert main(["eval", "custom-diffusion", "--custom_diffusion", str(out), "--n", "1", "--num_inference_steps", "1",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "prediction type: v_prediction" in capsys.readouterr().err
    given = shutil.copytree(tiny_model_dir / "tokenizer", tmp_path / "given-tokenizer")
    assert main(["generate", "--custom_diffusion", str(out), "--prompt", "<new1> star", "--num_inference_steps", "1",
                 "--tokenizer_name", str(given), "--out", str(tmp_path / "g2.png")]) == 0
    err = capsys.readouterr().err  # the tokenizer used is the one said (the recorded one was said, unused)
    assert f"tokenizer: {given} (--tokenizer_name)" in err and "(recorded in" not in err.split("tokenizer: ")[1]
    # the recorded base given by name: read as its run read it (with the recorded tokenizer)
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(out), "--rank", "1", "--output_dir",
                 str(tmp_path / "c1"), "--pretrained_model_name_or_path", f"{base}/"]) == 0
    # another base, given: its own tokenizer and scheduler (none here: the hint names a flag the command takes)
    base = tmp_path / "another-no-tokenizer"
    shutil.copytree(tmp_path / "no-tokenizer", base)
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(out), "--rank", "1", "--output_dir",
                 str(tmp_path / "c2"), "--pretrained_model_name_or_path", str(base)]) == 2
    err = capsys.readouterr().err
    assert "missing sub-folder(s) tokenizer" in err and "--tokenizer_name for tokenizer/" in err
    assert "--pretrained_vae_model_name_or_path" not in err
    assert main(["custom-diffusion", "compress", "--custom_diffusion", str(out), "--rank", "1", "--output_dir",
                 str(tmp_path / "c2"), "--pretrained_model_name_or_path", str(base),
                 "--tokenizer_name", str(tiny_model_dir / "tokenizer")]) == 0
    assert main(["generate", "--custom_diffusion", str(out), "--prompt", "<new1> star", "--num_inference_steps", "1",
                 "--pretrained_model_name_or_path", str(base), "--tokenizer_name", str(tiny_model_dir / "tokenizer"),
                 "--out", str(tmp_path / "g3.png")]) == 0  # (a KeyError: the given tokenizer taken for a record)


def test_concepts_or_a_controlnet_trained_with_other_prediction_types_are_refused(tiny_model_dir, tiny_base,
                                                                                  two_concepts, tmp_path, capsys):
    """Merged, or sampled together, one of them would be read with the other's prediction type."""
    import shutil

    from diffusers import ControlNetModel

    v = tmp_path / "v"  # a concept trained with --prediction_type v_prediction (the other predates the record)
    shutil.copytree(two_concepts[1], v)
    meta = json.loads((v / "custom_diffusion.json").read_text())
    (v / "custom_diffusion.json").write_text(json.dumps(dict(meta, prediction_type="v_prediction")))
    assert main(["custom-diffusion", "merge", "--concepts", str(two_concepts[0]), str(v),
                 "--output_dir", str(tmp_path / "m")]) == 2
    assert "merge: the concepts were trained with different prediction types" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    controlnet = tmp_path / "controlnet"  # a ControlNet run on the same base, trained with epsilon
    ControlNetModel.from_unet(tiny_base.unet).save_pretrained(controlnet)
    (controlnet / "difftune_config.json").write_text(json.dumps(
        {"model": {"pretrained_model_name_or_path": str(tiny_model_dir)}, "loss": {"prediction_type": "epsilon"}}))
    outline = str(tmp_path / "outline.png")
    Image.new("RGB", (64, 64)).save(outline)
    argv = ["generate", "--controlnet", str(controlnet), "--image", outline, "--prompt", "<new1> heart",
            "--num_inference_steps", "1", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--custom_diffusion", str(v)]) == 2
    assert "trained with different prediction types" in capsys.readouterr().err
    # the recorded base by name is the recorded base (its runs' prediction types still differ); another base
    # (here a copy of it) samples both with its own scheduler, warned about
    assert main([*argv, "--custom_diffusion", str(v), "--pretrained_model_name_or_path", str(tiny_model_dir)]) == 2
    assert "trained with different prediction types" in capsys.readouterr().err
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert main([*argv, "--custom_diffusion", str(v), "--pretrained_model_name_or_path", str(tmp_path / "copy")]) == 0
    assert "with prediction type v_prediction" in capsys.readouterr().err
