#!/usr/bin/env python3
"""Dump llama.cpp's intermediate tensors (its eval callback) for a token
sequence, to find where prima's engine parts from it. Pairs with prima's
`layers` example, which writes the hidden state after every layer:

    PY=$(scripts/llama-venv)
    $PY scripts/llama-dump.py --model M.gguf --ids '[2, 818, 5279]' --out /tmp/dump
    cargo run --release -p prima-kernels --example layers -- M.gguf '[2, 818, 5279]' ours.bin

Writes OUT/batch.npz (every tensor of one batch over all ids; numpy shape
is ggml's ne reversed) with OUT/batch.json (name, type, op, ne, nb, srcs in
graph order) and OUT/batch_logits.npy; with --decode-from P also the prompt
ids[:P] as a batch and then each later id alone, as OUT/seq_<pos>.npz/json.
Not run in CI (it needs the llama.cpp build from scripts/llama-venv).
"""
import argparse
import ctypes
import json
import os
import sys

import numpy as np
import llama_cpp
from llama_cpp import llama_cpp as L
import llama_cpp._logger as _lg

_lg.set_verbose(False)  # silence llama.cpp logging (verbose=False)


# ---------------------------------------------------------------- ggml C API
LIBDIR = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
ggml_base = ctypes.CDLL(os.path.join(LIBDIR, "libggml-base.so"))

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64


class ggml_tensor(ctypes.Structure):  # mirrors include/ggml.h (identical to vendor sdist)
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


assert ctypes.sizeof(ggml_tensor) == 336, ctypes.sizeof(ggml_tensor)

for fn, res, args in [
    ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
    ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
    ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
    ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
    ("ggml_is_contiguous", ctypes.c_bool, [ctypes.c_void_p]),
    ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
]:
    f = getattr(ggml_base, fn)
    f.restype = res
    f.argtypes = args

NP_TYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # F32, F16, I32


class Recorder:
    def __init__(self):
        self.reset()

    def reset(self):
        self.arrays = {}
        self.index = []
        self.counts = {}

    def cb(self, t, ask, _ud):
        if ask:
            return True
        try:
            self._record(t)
        except Exception as e:  # never let an exception cross into C
            print("callback error:", e, file=sys.stderr)
        return True

    def _record(self, t):
        st = ggml_tensor.from_address(t)
        name = ggml_base.ggml_get_name(t).decode()
        ne = [int(x) for x in st.ne]
        nb = [int(x) for x in st.nb]
        ty = int(st.type)
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        key = name if k == 0 else f"{name}#{k}"
        contig = bool(ggml_base.ggml_is_contiguous(t))
        view_src = ggml_base.ggml_get_name(st.view_src).decode() if st.view_src else None
        srcs = [ggml_base.ggml_get_name(s).decode() for s in st.src if s]
        entry = dict(order=len(self.index), key=key, name=name,
                     type=ggml_base.ggml_type_name(ty).decode(),
                     op=ggml_base.ggml_op_desc(t).decode(),
                     ne=ne, nb=nb, contiguous=contig, view_src=view_src,
                     view_offs=int(st.view_offs), srcs=srcs, saved=False,
                     op_params_i32=[int(x) for x in st.op_params],
                     op_params_f32=[float(x) for x in np.array(list(st.op_params), dtype=np.int32).view(np.float32)])
        dt = NP_TYPES.get(ty)
        if dt is not None:
            nbytes = int(ggml_base.ggml_nbytes(t))
            buf = np.empty(nbytes, dtype=np.uint8)
            ggml_base.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
            # nbytes = type_size + sum((ne[i]-1)*nb[i]) covers the strided extent
            arr = np.lib.stride_tricks.as_strided(
                buf.view(dt) if nbytes % np.dtype(dt).itemsize == 0 else buf[: nbytes - nbytes % np.dtype(dt).itemsize].view(dt),
                shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
            arr = np.array(arr, dtype=np.float32 if ty != 26 else np.int32)
            self.arrays[key] = arr
            entry["saved"] = True
            entry["np_shape"] = list(arr.shape)
        self.index.append(entry)

    def save(self, out, stem):
        np.savez(os.path.join(out, stem + ".npz"), **self.arrays)
        with open(os.path.join(out, stem + ".json"), "w") as f:
            json.dump(self.index, f, indent=1)




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="token ids as a JSON list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash-attention path")
    ap.add_argument("--decode-from", type=int, default=None,
                    help="also evaluate ids[:P] as a batch and the rest one by one")
    a = ap.parse_args()
    ids = json.loads(a.ids)
    os.makedirs(a.out, exist_ok=True)
    llama_cpp.llama_backend_init()
    rec = Recorder()
    cb = L.ggml_backend_sched_eval_callback(rec.cb)  # keep a reference alive
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    assert model, "model did not load"
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def new_ctx():
        cp = L.llama_context_default_params()
        cp.n_ctx = max(512, len(ids) + 8)
        cp.n_batch = cp.n_ubatch = cp.n_ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = 1
        cp.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if a.flash_attn
                              else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.cb_eval = cb
        cp.cb_eval_user_data = None
        ctx = L.llama_init_from_model(model, cp)
        assert ctx, "context did not open"
        return ctx

    def decode(ctx, toks, pos0):
        b = L.llama_batch_init(len(toks), 0, 1)
        b.n_tokens = len(toks)
        for i, tok in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos0 + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1
        rc = L.llama_decode(ctx, b)
        L.llama_batch_free(b)
        assert rc == 0, f"llama_decode returned {rc}"

    ctx = new_ctx()
    rec.reset()
    decode(ctx, ids, 0)
    logits = np.array([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                       for i in range(len(ids))], dtype=np.float32)
    np.save(os.path.join(a.out, "batch_logits.npy"), logits)
    rec.save(a.out, "batch")
    L.llama_free(ctx)
    print(f"batch: {len(rec.index)} tensors, written to {a.out}")
    if a.decode_from is not None:
        p0 = a.decode_from
        ctx = new_ctx()
        rec.reset()
        decode(ctx, ids[:p0], 0)
        for p in range(p0, len(ids)):
            rec.reset()
            decode(ctx, [ids[p]], p)
            rec.save(a.out, f"seq_{p}")
        L.llama_free(ctx)
        print(f"decoded positions {p0}..{len(ids)} one at a time")
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
