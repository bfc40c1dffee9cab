"""A real prior from a clip-retrieval kNN back-end (``difftune retrieve``).

The paper (Kumari et al. 2023, sec. 3.1) regularises with 200 real images whose LAION captions
are close to the class prompt (CLIP text similarity > 0.85). diffusers' ``retrieve.py`` queried
the public LAION back-end, which no longer exists, so the back-end URL is a required setting:
a self-hosted ``clip-retrieval back`` (same JSON API) or anything that speaks it.

API: ``POST <backend>`` with JSON ``{"text", "modality": "image", "indice_name", "num_images",
"num_result_ids", "deduplicate", "use_safety_model", "use_violence_detector", "aesthetic_score",
"aesthetic_weight", ...}``; the answer is a JSON list of ``{"url", "caption", "similarity", "id"}``
(an ``"image"`` field with base64 bytes is used when there is no URL).

Output, as diffusers' ``retrieve.py`` writes it and ``--real_prior`` reads it:
``DIR/images/{i}.jpg`` (the downloaded bytes, whatever their format), ``DIR/images.txt``
(image paths), ``DIR/caption.txt`` and ``DIR/urls.txt`` (one line per image).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import UserError

FACTOR = 1.5  # ask for more results than needed: some URLs are dead


class RetrievalError(UserError):
    """The kNN back-end cannot be reached or answers something unusable."""


def query_backend(backend: str, text: str, num_images: int, indice_name: str = "laion5B-L-14",
                  aesthetic_weight: float = 0.1, timeout: float = 30.0) -> list[dict]:
    body = {
        "text": text, "image": None, "image_url": None, "embedding_input": None, "modality": "image",
        "indice_name": indice_name, "num_images": num_images, "num_result_ids": num_images,
        "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
        "aesthetic_score": 9, "aesthetic_weight": aesthetic_weight, "use_mclip": False,
    }
    req = urllib.request.Request(backend, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise RetrievalError(f"--backend {backend} answered HTTP {e.code} ({e.reason}). Is it a clip-retrieval "
                             "kNN endpoint (usually .../knn-service)? Check --indice_name too.") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise RetrievalError(f"--backend {backend} cannot be reached ({reason}). The public LAION back-end is gone: "
                             "run your own (`clip-retrieval back`) and pass its URL, or use a local folder of "
                             "images with captions as --class_data_dir with --real_prior.") from None
    except json.JSONDecodeError:
        raise RetrievalError(f"--backend {backend} did not answer JSON; is it a clip-retrieval kNN endpoint?") from None
    if isinstance(answer, dict) and "error" in answer:
        raise RetrievalError(f"--backend {backend} reported an error: {answer['error']}")
    if not isinstance(answer, list):
        raise RetrievalError(f"--backend {backend} answered {type(answer).__name__}, not a list of results.")
    return [r for r in answer if isinstance(r, dict) and (r.get("url") or r.get("image"))]


def _fetch(result: dict, timeout: float) -> bytes | None:
    """The image bytes of a result if they decode as an image, else None (dead link, HTML page...)."""
    from PIL import Image

    try:
        if result.get("url"):
            with urllib.request.urlopen(result["url"], timeout=timeout) as resp:
                data = resp.read()
        else:
            data = base64.b64decode(result["image"])
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return data
    except Exception:  # any failure of one result just skips it, as diffusers' retrieve.py does
        return None


def retrieve(class_prompt: str, class_data_dir: str | Path, num_class_images: int, backend: str,
             indice_name: str = "laion5B-L-14", timeout: float = 30.0, max_results: int = 10_000,
             progress: bool = True) -> Path:
    """Download ``num_class_images`` images for ``class_prompt`` into ``class_data_dir``."""
    from tqdm.auto import tqdm

    if urllib.parse.urlparse(backend).scheme not in ("http", "https"):
        raise RetrievalError(f"--backend {backend!r} is not an http(s) URL; give the clip-retrieval kNN endpoint, "
                             "e.g. http://HOST:1234/knn-service.")
    out = Path(class_data_dir)
    images = out / "images"
    if (out / "images.txt").is_file():
        listed = [x for x in (out / "images.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(listed) >= num_class_images:
            return out
    n = int(FACTOR * num_class_images)
    results = query_backend(backend, class_prompt, n, indice_name, timeout=timeout)
    while len(results) < FACTOR * num_class_images and n < max_results:
        n = int(FACTOR * n)
        results = query_backend(backend, class_prompt, n, indice_name, timeout=timeout)
    images.mkdir(parents=True, exist_ok=True)  # (after the back-end answered: a failed query leaves no folder)
    bar = tqdm(total=num_class_images, desc="downloading real prior images", unit="img", disable=not progress)
    paths, captions, urls = [], [], []
    for result in results:
        if len(paths) == num_class_images:
            break
        data = _fetch(result, timeout)
        if data is None:
            continue
        path = images / f"{len(paths)}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
        captions.append(" ".join(str(result.get("caption") or class_prompt).split()))
        urls.append(str(result.get("url") or ""))
        bar.update(1)
    bar.close()
    if not paths:
        raise RetrievalError(f"--backend {backend} returned {len(results)} results for {class_prompt!r}, and none "
                             "could be downloaded as an image.")
    for name, lines in (("caption.txt", captions), ("urls.txt", urls), ("images.txt", paths)):
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")  # images.txt last: marks completion
    if len(paths) < num_class_images:
        print(f"warning: only {len(paths)} of {num_class_images} images could be downloaded")
    return out
