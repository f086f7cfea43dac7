"""Test helper: damage a tensor's bytes inside a saved file, as bit rot on disk would."""
import torch


def flip_bytes_of(path, tensor, n=64):
    """Flip ``n`` bytes in the middle of ``tensor``'s storage inside the file at ``path``
    (found by content: torch.save stores tensor bytes verbatim)."""
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(data[:256])
    assert at >= 0 and raw.find(data[:256], at + 1) < 0, "the tensor's bytes are not unique in the file"
    at += max(0, len(data) // 2 - n // 2)
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    with open(path, "wb") as f:
        f.write(bytes(raw))
