"""One grid layer's tensors in compressed-tensors' layout, from its integer codes (:mod:`.layout` for the
conventions); shared by :mod:`.writer` (layers) and :mod:`.moe` (experts, which have no module of their own)."""
from __future__ import annotations


def packed_codes(name, codes, grid, kind: str = "pack") -> dict:
    """:func:`.writer.packed_tensors` from the codes ``(out, in)`` int32 of ``grid`` (a MoE expert has no module)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 0 if grid.symmetric else 2 ** (grid.bits - 1)
    q = (codes - offset).to(torch.int8)
    scale = grid.scale.detach().cpu().to(torch.float16)
    zp = None if grid.symmetric else (grid.zero.detach().cpu() - offset).to(torch.int8)
    if kind == "block":  # GPT-2 Conv1D: its own (in, out) orientation, blocks [group, 1]
        q, scale, zp = q.t().contiguous(), scale.t(), None if zp is None else zp.t()
    out = {f"{name}.weight_scale": scale.contiguous()}
    if kind in ("naive", "int"):
        out[f"{name}.weight"] = q.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_to_int32(q, grid.bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(q.shape))
    if zp is not None:
        out[f"{name}.weight_zero_point"] = (pack_to_int32(zp, grid.bits, packed_dim=0) if kind == "pack"
                                            else zp).contiguous()
    return out
