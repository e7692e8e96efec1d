"""Images for tests and demos, and the visual-token counts the HF processor gives them."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients, blocks) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([
        (x * 255 // max(1, width - 1)),
        (y * 255 // max(1, height - 1)),
        ((x // 32 + y // 32) % 2) * 200,
    ], axis=-1).astype(np.float64)
    img += rng.normal(0, 25, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image: Image.Image, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image)}, **extra}


def chat_messages(images: list[Image.Image], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [image_part(im) for im in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@lru_cache(maxsize=4)
def _hf_processor(model_dir: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def qwen_image_grid(model_dir: str | Path, image: Image.Image) -> tuple[int, int, int]:
    """(t, h, w) of the image's LM token grid, as the model's own HF processor computes it."""
    proc = _hf_processor(str(model_dir)).image_processor
    out = proc(images=[image], return_tensors="pt")
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    merge = proc.merge_size
    return t, h // merge, w // merge


def qwen_image_tokens(model_dir: str | Path, image: Image.Image) -> int:
    t, h, w = qwen_image_grid(model_dir, image)
    return t * h * w


def make_video_frames(width: int, height: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 RGB: a moving pattern with noise, deterministic."""
    frames = []
    for i in range(num_frames):
        base = np.asarray(make_image(width, height, seed=seed * 1000 + i), dtype=np.int16)
        frames.append(np.roll(base, shift=4 * i, axis=1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def make_video(width: int, height: int, num_frames: int, fps: float = 2.0, seed: int = 0) -> bytes:
    """An mp4 (MPEG-4 part 2, written by OpenCV) of :func:`make_video_frames`."""
    import os
    import tempfile

    import cv2

    frames = make_video_frames(width, height, num_frames, seed)
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4 here")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def decode_video(data: bytes) -> tuple[np.ndarray, float]:
    """(frames (n, h, w, 3) uint8 RGB, fps) of an mp4, decoded with OpenCV (as vLLM's default
    video loader does)."""
    import os
    import tempfile

    import cv2

    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        Path(path).write_bytes(data)
        cap = cv2.VideoCapture(path)
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        cap.release()
    finally:
        os.unlink(path)
    return np.stack(frames), fps


def video_data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_part(data: bytes, **extra: Any) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": video_data_url(data)}, **extra}


def media_messages(parts: list[Any], text: str) -> list[dict[str, Any]]:
    """A user message with the given media (PIL images or mp4 bytes, in order) and text."""
    content: list[dict[str, Any]] = [
        video_part(p) if isinstance(p, bytes) else image_part(p) for p in parts
    ]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def qwen_video_grid(model_dir: str | Path, data: bytes) -> tuple[int, int, int]:
    """(t, h, w) of an mp4's LM token grid, as the model's own HF video processor computes it
    from the frames and metadata vLLM's OpenCV loader gives it (every frame, the file's fps)."""
    from transformers.video_utils import VideoMetadata

    frames, fps = decode_video(data)
    n = len(frames)
    meta = VideoMetadata(total_num_frames=n, fps=fps, duration=n / fps,
                         frames_indices=list(range(n)), video_backend="opencv")
    proc = _hf_processor(str(model_dir)).video_processor
    out = proc(videos=[frames], video_metadata=[meta], return_tensors="pt")
    t, h, w = (int(v) for v in out["video_grid_thw"][0])
    merge = proc.merge_size
    return t, h // merge, w // merge


def qwen_video_tokens(model_dir: str | Path, data: bytes) -> int:
    t, h, w = qwen_video_grid(model_dir, data)
    return t * h * w
