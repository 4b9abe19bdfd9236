"""ctypes mirrors of backends/native/decode_step.cpp's structs and entry points (field order = the C++ one)."""

from __future__ import annotations

import ctypes

i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# dsv4d_abi(): 4 = dsv4d_run / dsv4d_records read the sequences' state arrays (state.py `_c`); 5 = the
# speculative entry points (decode_spec.h); 6 = dsv4d_run also returns each row's greedy token (`top`),
# dsv4d_argmax
ABI = 6
CTR_BYTES = 32     # one SeqCtr (the addresses of a layer's kv / comp_buf / index_keys / index_buf arrays)


class Lin(ctypes.Structure):
    _fields_ = [("kind", i64), ("w", vp), ("ldw", i64), ("s", vp), ("lds", i64), ("N", i64), ("K", i64)]


class Comp(ctypes.Structure):
    _fields_ = [("wkv", Lin), ("wgate", Lin), ("ape", vp), ("norm", vp), ("m", i64), ("overlap", i64), ("c", i64)]


class AttnP(ctypes.Structure):
    _fields_ = ([(n, Lin) for n in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "iwq_b", "iw_proj")]
                + [(n, vp) for n in ("q_norm", "kv_norm", "sink", "freqs")]
                + [("comp", Comp), ("icomp", Comp)]
                + [(n, i64) for n in ("d", "H", "D", "rope_half", "q_lora", "G", "o_lora", "W", "ratio", "csa",
                                      "ih", "idim", "topk")]
                + [("eps", f32), ("iscale", f32)])


class SeqP(ctypes.Structure):
    _fields_ = [("pos", i64), ("kv", vp), ("n_entries", i64), ("pk", vp), ("ps", vp), ("pstart", i64),
                ("ikeys", vp), ("n_index", i64), ("ipk", vp), ("ips", vp), ("ipstart", i64)]


class MoeP(ctypes.Structure):
    _fields_ = [("gate_w", vp), ("bias", vp), ("tid2eid", vp), ("experts", vp), ("shared", vp),
                ("d", i64), ("E", i64), ("k", i64), ("inter", i64), ("shared_inter", i64),
                ("route_scale", f32), ("limit", f32)]


class HcP(ctypes.Structure):
    _fields_ = [("fn", vp), ("base", vp), ("scale", vp), ("norm", vp), ("hc", i64), ("d", i64), ("iters", i64),
                ("hc_eps", f32), ("norm_eps", f32)]


class LayerP(ctypes.Structure):
    _fields_ = [("ha", ctypes.POINTER(HcP)), ("A", ctypes.POINTER(AttnP)), ("hf", ctypes.POINTER(HcP)),
                ("M", ctypes.POINTER(MoeP))]


class HeadP(ctypes.Structure):
    _fields_ = [("fn", vp), ("base", vp), ("scale", vp), ("norm", vp), ("hc", i64), ("d", i64),
                ("hc_eps", f32), ("norm_eps", f32), ("w", Lin)]


class MtpP(ctypes.Structure):
    _fields_ = [("embed", vp), ("embed_kind", i64), ("enorm", vp), ("hnorm", vp), ("e_proj", Lin), ("h_proj", Lin),
                ("hc", i64), ("d", i64), ("eps", f32)]


class EmbedP(ctypes.Structure):
    _fields_ = [("w", vp), ("kind", i64), ("V", i64), ("hc", i64), ("d", i64)]


def bind(lib):
    P = ctypes.POINTER
    lib.dsv4d_hc_pre.argtypes = [P(HcP), i64, vp, vp, vp, vp]
    lib.dsv4d_hc_post.argtypes = [i64, i64, i64, vp, vp, vp, vp, vp]
    lib.dsv4d_attn.argtypes = [P(AttnP), i64, vp, P(SeqP), vp, ctypes.c_int]
    lib.dsv4d_moe.argtypes = [P(MoeP), i64, vp, vp, vp, ctypes.c_int]
    lib.dsv4d_block.argtypes = [P(HcP), P(AttnP), P(HcP), P(MoeP), i64, vp, vp, P(SeqP), vp, ctypes.c_int]
    lib.dsv4d_step.argtypes = [i64, P(LayerP), i64, vp, vp, vp, vp, vp, vp, ctypes.c_int]
    lib.dsv4d_step_rows.restype = lib.dsv4d_mtp_step.restype = lib.dsv4d_spec_step.restype = ctypes.c_int
    lib.dsv4d_step_rows.argtypes = [i64, P(LayerP), i64, i64, vp, vp, vp, vp, vp, vp, ctypes.c_int]
    lib.dsv4d_mtp_step.argtypes = [P(MtpP), P(LayerP), P(HeadP), i64, i64, vp, vp, vp, vp, vp, ctypes.c_int,
                                   ctypes.c_int]
    lib.dsv4d_spec_step.argtypes = [P(MtpP), P(LayerP), P(HeadP), i64, i64, vp, vp, vp, i64, P(LayerP), P(HeadP),
                                    vp, vp, vp, vp, vp, ctypes.c_int]
    lib.dsv4d_records.argtypes = [P(AttnP), i64, vp, P(SeqP)]
    lib.dsv4d_run_greedy.argtypes = [i64, P(LayerP), i64, vp, vp, P(HeadP), vp, ctypes.c_int, P(EmbedP), vp]
    lib.dsv4d_run_greedy.restype = ctypes.c_int
    lib.dsv4d_run.argtypes = [i64, P(LayerP), i64, vp, vp, vp, vp, vp, vp, ctypes.c_int, P(EmbedP), vp]
    lib.dsv4d_hc_head.argtypes = [i64, i64, i64, vp, vp, vp, vp, f32, f32, vp]
    for f in ("dsv4d_hc_head", "dsv4d_hc_pre", "dsv4d_hc_post", "dsv4d_attn", "dsv4d_moe", "dsv4d_block",
              "dsv4d_step"):
        getattr(lib, f).restype = None
    lib.dsv4d_argmax.argtypes = [i64, i64, vp, vp]
    lib.dsv4d_argmax.restype = None
    lib.dsv4d_records.restype = lib.dsv4d_run.restype = ctypes.c_int
    lib.dsv4d_abi.restype = ctypes.c_int
    if lib.dsv4d_abi() != ABI:
        raise RuntimeError(f"decode library ABI {lib.dsv4d_abi()}, these bindings are for {ABI}")
    return lib
