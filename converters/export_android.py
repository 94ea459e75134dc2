"""The bundle's decoder graph rewritten for the Android app's runtime, ONNX Runtime 1.17.

The app ships ONNX Runtime 1.17.1 (C API 17). Its CPU kernels lack some of the ops the bundle's
graph is built from: GroupQueryAttention (fp16-only there), GatherBlockQuantized, 8-bit
MatMulNBits, opset 20's Gelu. This pass rewrites a bundle's `model.onnx` node by node, with no
re-quantization:

- GroupQueryAttention -> RotaryEmbedding (a contrib op 1.17 has) + attention in standard ops. The
  cache is an input the graph only reads ([1, kv_heads, capacity, head_dim] per layer, slots past `past_length` masked); the graph
  outputs only the new tokens' keys and values, which the caller writes into its cache rows. The
  past and the new tokens are scored apart and joined under one softmax, so the cache is never
  concatenated (copied) inside the graph either.
- GatherBlockQuantized (8-bit) -> Gather of the codes and scales, then (code - zero point) * scale.
- MatMulNBits with 8-bit blocks -> two 4-bit MatMulNBits over the high and low nibbles (scales 16s
  and s): the same weights exactly, at 4-bit kernels' speed.
- Gelu (opset 20) -> the contrib FastGelu (tanh) or Gelu (erf), which 1.17 has.

Every initializer left as it was stays in the bundle's `model.onnx.data` (the new graph points at
it); only the nibble halves go to `android.onnx.data`. The manifest gets `backends.android`: the
graph's signature, the cache layout, and the chat template as per-role text (the app has no jinja).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ondevice.bundle import MANIFEST, read_bundle, sha256_file
from ondevice.errors import BundleError, ChatTemplateError
from ondevice.tokenizer import load_tokenizer

ORT_API = 17  # the newest C API the app's runtime has
OPSET = 19  # ONNX Runtime 1.17 runs up to opset 20; nothing here needs more than 18
IR_VERSION = 9
GRAPH, DATA = "android.onnx", "android.onnx.data"
MS = "com.microsoft"
NEG = -1e30  # masked scores: finite, so no row can become NaN


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, folder: Path, cfg: dict):
        self.model, self.folder = model, folder
        self.hd, self.kv = int(cfg["head_dim"]), int(cfg["num_kv_heads"])
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.inits = {t.name: t for t in model.graph.initializer}
        self._consts: set[str] = set()
        self._masks: dict[tuple[int, int], tuple[str, str]] = {}

    # -- plumbing ----------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output + "/" + op, domain=domain, **attrs))
        return output

    def const(self, name: str, value) -> str:
        if name not in self._consts:
            self._consts.add(name)
            self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name], base_dir=os.fspath(self.folder))

    def ints(self, *v: int) -> str:
        return self.const("c.i64." + "_".join(str(x).replace("-", "m") for x in v), np.array(v, np.int64))

    # -- shared inputs -----------------------------------------------------------------------
    def positions(self) -> None:
        """position_ids = past_length + [0, T), the row the logits come from (T - 1), the cache's
        capacity and the position grids the masks compare."""
        t = self.node("Gather", [self.node("Shape", ["input_ids"], "android.ids_shape"), self.ints(1)], "android.T")
        t0 = self.node("Squeeze", [t, self.ints(0)], "android.T_scalar")
        steps = self.node("Range", [self.const("c.zero", np.array(0, np.int64)), t0,
                                    self.const("c.one", np.array(1, np.int64))], "android.steps")
        pos = self.node("Add", [steps, "past_length"], "android.pos")
        self.node("Unsqueeze", [pos, self.ints(0)], "position_ids")
        self.node("Sub", [t, self.ints(1)], "logits_from")
        cap = self.node("Gather", [self.node("Shape", ["past_key.0"], "android.cache_shape"), self.ints(2)],
                        "android.capacity")
        slots = self.node("Range", ["c.zero", self.node("Squeeze", [cap, self.ints(0)], "android.cap_scalar"), "c.one"],
                          "android.slots")
        self.node("Unsqueeze", [pos, self.ints(1)], "android.qpos")  # [T, 1]
        self.node("Unsqueeze", [slots, self.ints(0)], "android.kpos")  # [1, capacity]
        self.node("Unsqueeze", [pos, self.ints(0)], "android.npos")  # [1, T]

    def masks(self, window: int, group: int) -> tuple[str, str]:
        """Additive masks [group * T, capacity] over the cache (slots below past_length, inside the
        window) and [group * T, T] over the new tokens (causal, inside the window), row g * T + t for
        query t of head g in a KV group; window <= 0: no window. Made once, shared by the layers."""
        if (window, group) in self._masks:
            return self._masks[window, group]
        p = f"android.mask{window if window > 0 else ''}.g{group}"
        zero, neg = self.const("c.f0", np.array(0, np.float32)), self.const("c.neg", np.array(NEG, np.float32))
        past_ok = self.node("Less", ["android.kpos", "past_length"], p + ".past_filled")  # [1, capacity]
        new_ok = self.node("LessOrEqual", ["android.npos", "android.qpos"], p + ".causal")  # [T, T]
        if window > 0:  # a key at distance >= window is out of a sliding-window layer's reach
            w = self.const(f"c.window{window}", np.array(window, np.int64))
            near = self.node("Less", [self.node("Sub", ["android.qpos", "android.kpos"], p + ".past_dist"), w], p + ".near")
            past_ok = self.node("And", [past_ok, near], p + ".past_ok")
            near_new = self.node("Less", [self.node("Sub", ["android.qpos", "android.npos"], p + ".new_dist"), w],
                                 p + ".new_near")
            new_ok = self.node("And", [new_ok, near_new], p + ".new_ok")
        else:
            past_ok = self.node("Expand", [past_ok, self.node("Concat", ["android.T", "android.capacity"],
                                                              p + ".past_shape", axis=0)], p + ".past_ok")
        tiles = self.ints(group, 1)
        self._masks[window, group] = tuple(
            self.node("Tile", [self.node("Where", [ok, zero, neg], f"{p}.{name}1"), tiles], f"{p}.{name}")
            for ok, name in ((past_ok, "past"), (new_ok, "new")))
        return self._masks[window, group]

    # -- the three rewrites --------------------------------------------------------------------
    def attention(self, n: onnx.NodeProto) -> None:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if a.get("rotary_interleaved", 0) or a.get("softcap", 0.0) or not a.get("do_rotary", 0):
            raise BundleError(f"{n.name}: GroupQueryAttention with interleaved rotary, softcap or no rotary "
                              "has no Android rewrite yet")
        heads, kv, hd = int(a["num_heads"]), int(a["kv_num_heads"]), self.hd
        scale = float(a.get("scale", hd ** -0.5))
        ins = list(n.input) + [""] * 17
        past_k, past_v, cos, sin = ins[3], ins[4], ins[7], ins[8]
        p = n.output[0]
        if ins[1]:  # q, k and v as three inputs
            q, k, v = ins[0], ins[1], ins[2]
        else:  # packed [1, T, (heads + 2 kv) * hd]
            q, k, v = p + ".q", p + ".k", p + ".v"
            self.nodes.append(helper.make_node("Split", [ins[0], self.ints(heads * hd, kv * hd, kv * hd)], [q, k, v],
                                               name=p + "/Split", axis=2))
        # rotary on [1, T, heads * hd] (ONNX Runtime 1.17 takes 3-d inputs, the head size from the table)
        q = self.node("RotaryEmbedding", [q, "position_ids", cos, sin], p + ".q_rot", MS, interleaved=0)
        k = self.node("RotaryEmbedding", [k, "position_ids", cos, sin], p + ".k_rot", MS, interleaved=0)
        layer = past_k.split("past_key", 1)[1]
        q = self.node("Transpose", [self.node("Reshape", [q, self.ints(1, -1, heads, hd)], p + ".q4")], p + ".qt",
                      perm=[0, 2, 1, 3])
        q = self.node("Reshape", [q, self.ints(1, kv, -1, hd)], p + ".qg")  # [1, kv, group * T, hd]: rows g * T + t
        k = self.node("Transpose", [self.node("Reshape", [k, self.ints(1, -1, kv, hd)], p + ".k4")],
                      "new_key" + layer, perm=[0, 2, 1, 3])  # [1, kv, T, hd]
        v = self.node("Transpose", [self.node("Reshape", [v, self.ints(1, -1, kv, hd)], p + ".v4")],
                      "new_value" + layer, perm=[0, 2, 1, 3])
        mask_past, mask_new = self.masks(int(a.get("local_window_size", -1)), heads // kv)
        s_past = self.node("FusedMatMul", [q, past_k], p + ".s_past", MS, transB=1, alpha=scale)
        s_new = self.node("FusedMatMul", [q, k], p + ".s_new", MS, transB=1, alpha=scale)
        scores = self.node("Concat", [self.node("Add", [s_past, mask_past], p + ".s_past_m"),
                                      self.node("Add", [s_new, mask_new], p + ".s_new_m")], p + ".scores", axis=-1)
        probs = self.node("Softmax", [scores], p + ".probs", axis=-1)
        big = self.ints(np.iinfo(np.int64).max)
        p_past = self.node("Slice", [probs, self.ints(0), "android.capacity", self.ints(3)], p + ".p_past")
        p_new = self.node("Slice", [probs, "android.capacity", big, self.ints(3)], p + ".p_new")
        out = self.node("Add", [self.node("MatMul", [p_past, past_v], p + ".o_past"),
                                self.node("MatMul", [p_new, v], p + ".o_new")], p + ".o")
        out = self.node("Transpose", [self.node("Reshape", [out, self.ints(1, heads, -1, hd)], p + ".oh")],
                        p + ".ot", perm=[0, 2, 1, 3])
        self.node("Reshape", [out, self.ints(1, -1, heads * hd)], p)

    def gather_blocks(self, n: onnx.NodeProto) -> None:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        codes = self.inits.get(n.input[0])
        if a.get("bits", 4) != 8 or a.get("gather_axis", 0) != 0 or codes is None or codes.data_type != TensorProto.UINT8:
            raise BundleError(f"{n.name}: only 8-bit uint8 GatherBlockQuantized embeddings have an Android rewrite")
        p = n.output[0]
        rows = self.node("Cast", [self.node("Gather", [n.input[0], n.input[1]], p + ".codes")], p + ".codes_f",
                         to=TensorProto.FLOAT)
        if len(n.input) > 3 and n.input[3]:
            zp = self.node("Cast", [self.node("Gather", [n.input[3], n.input[1]], p + ".zp")], p + ".zp_f",
                           to=TensorProto.FLOAT)
        else:
            zp = self.const("c.f128", np.array(128, np.float32))
        scales = self.node("Gather", [n.input[2], n.input[1]], p + ".scales")
        self.node("Mul", [self.node("Sub", [rows, zp], p + ".centered"), scales], p)

    def matmul_8bit(self, n: onnx.NodeProto) -> None:
        """w = s (c - z) with c = 16 hi + lo and z = 16 zh + zl: 16s (hi - zh) + s (lo - zl)."""
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        k, nn, block = int(a["K"]), int(a["N"]), int(a["block_size"])
        codes = self.array(n.input[1]).reshape(nn, -1, block)
        scales = self.array(n.input[2]).reshape(nn, -1).astype(np.float32)
        if len(n.input) > 3 and n.input[3]:
            zp = self.array(n.input[3]).reshape(nn, -1)
        else:
            zp = np.full(scales.shape, 128, np.uint8)
        outs = []
        for half, c, z, s in (("hi", codes >> 4, zp >> 4, scales * 16), ("lo", codes & 15, zp & 15, scales)):
            name = f"{n.output[0]}.{half}"
            packed = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
            zpad = np.pad(z, ((0, 0), (0, z.shape[1] % 2)))
            zpacked = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
            inputs = [n.input[0], self.const(name + ".qweight", packed), self.const(name + ".scales", s.reshape(-1)),
                      self.const(name + ".zero_points", zpacked)]
            outs.append(self.node("MatMulNBits", inputs, name, MS, K=k, N=nn, bits=4, block_size=block,
                                  accuracy_level=int(a.get("accuracy_level", 0))))
        self.node("Add", outs, n.output[0])

    def run(self) -> None:
        self.positions()
        for n in self.model.graph.node:
            bits = next((helper.get_attribute_value(x) for x in n.attribute if x.name == "bits"), None)
            if n.op_type == "GroupQueryAttention":
                self.attention(n)
            elif n.op_type == "GatherBlockQuantized":
                self.gather_blocks(n)
            elif n.op_type == "MatMulNBits" and bits == 8:
                self.matmul_8bit(n)
            elif n.op_type == "Gelu" and n.domain in ("", "ai.onnx"):  # opset 20; 1.17 has the contrib ops
                tanh = any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)
                self.node("FastGelu" if tanh else "Gelu", list(n.input), n.output[0], MS)
            else:
                self.nodes.append(n)


def _signature(cfg: dict, vocab: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto], dict]:
    kv, hd, layers = int(cfg["num_kv_heads"]), int(cfg["head_dim"]), int(cfg["num_layers"])
    inputs = [("input_ids", TensorProto.INT64, [1, "T"]), ("past_length", TensorProto.INT64, [1])]
    outputs = [("logits", TensorProto.FLOAT, [1, 1, vocab])]
    for i in range(layers):
        inputs += [(f"past_{n}.{i}", TensorProto.FLOAT, [1, kv, "capacity", hd]) for n in ("key", "value")]
        outputs += [(f"new_{n}.{i}", TensorProto.FLOAT, [1, kv, "T", hd]) for n in ("key", "value")]
    dtype = {TensorProto.INT64: "int64", TensorProto.FLOAT: "float32"}
    spec = {"inputs": [{"name": n, "dtype": dtype[t], "shape": s} for n, t, s in inputs],
            "outputs": [{"name": n, "dtype": dtype[t], "shape": s} for n, t, s in outputs]}
    return ([helper.make_tensor_value_info(*x) for x in inputs], [helper.make_tensor_value_info(*x) for x in outputs],
            spec)


def _write_external(tensors: list[onnx.TensorProto], path: Path) -> None:
    """Move the tensors' bytes into one file (64-byte aligned) and point the tensors at it."""
    with open(path, "wb") as f:
        for t in tensors:
            raw = t.raw_data or numpy_helper.to_array(t).tobytes()
            f.write(b"\0" * (-f.tell() % 64))
            offset = f.tell()
            f.write(raw)
            t.ClearField("raw_data")
            for field in ("int32_data", "int64_data", "float_data", "double_data", "uint64_data"):
                t.ClearField(field)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)


def chat_format(tokenizer) -> dict:
    """The chat template as text around each message: {roles: {role: [before, after]}, first_system
    (text the template adds when the conversation does not start with a system message),
    generation_prompt, strip_content (the template strips each message, as Python's str.strip)}. Derived by rendering marked messages, then checked against the sandboxed
    jinja rendering on several conversations. A template that folds the system message into the
    first turn (Gemma's) gets no "system" role; one that trims, merges or reorders user and
    assistant messages raises."""
    def mark(tag: str) -> str:
        return f"\ue000{tag}\ue000"  # private use: neither whitespace nor likely in a template

    def render(roles_tags: list[tuple[str, str]], gen: bool = False) -> str:
        return tokenizer.render_chat([{"role": r, "content": mark(t)} for r, t in roles_tags], add_generation_prompt=gen)

    def cut(text: str, prefix: str = "", suffix: str = "") -> str:
        if not (text.startswith(prefix) and text.endswith(suffix)) or len(prefix) + len(suffix) > len(text):
            raise ChatTemplateError("the chat template does not render each message on its own; the Android app "
                                    "cannot use it")
        return text[len(prefix):len(text) - len(suffix)]

    turns = render([("user", "X"), ("assistant", "Y"), ("user", "Z")])
    lead, rest = turns.split(mark("X"), 1)
    user_to_assistant, rest = rest.split(mark("Y"), 1)
    assistant_to_user, user_after = rest.split(mark("Z"), 1)
    assistant_after = render([("user", "X"), ("assistant", "Y")]).split(mark("Y"), 1)[1]
    user_before = cut(assistant_to_user, prefix=assistant_after)
    roles = {"user": [user_before, user_after],
             "assistant": [cut(user_to_assistant, prefix=user_after), assistant_after]}
    alone = render([("user", "X")])
    fmt = {"roles": roles, "first_system": cut(lead, suffix=user_before),
           "generation_prompt": cut(render([("user", "X")], True), prefix=alone)}
    chats = [[("user", "Hi there!\n  Two lines. ")],
             [("user", "a"), ("assistant", "b\n\n"), ("user", "c")],
             [("user", " x"), ("assistant", "y "), ("user", "z\n"), ("assistant", "w")]]
    with_system = [[("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"), ("user", " And 3+3?\n")],
                   [("system", "S"), ("user", "u")]]
    if not _renders_as(fmt, tokenizer, chats[:1]):
        fmt["strip_content"] = True
    try:
        system_before, rest = render([("system", "S"), ("user", "X")]).split(mark("S"), 1)
        system = [system_before, cut(rest.split(mark("X"), 1)[0], suffix=user_before)]
        if _renders_as(dict(fmt, roles=dict(roles, system=system)), tokenizer, with_system):
            roles["system"] = system
    except (ChatTemplateError, ValueError):
        pass  # no system role of its own
    if not _renders_as(fmt, tokenizer, chats):
        raise ChatTemplateError("the chat template is not text around each message (it trims, merges or "
                                "reorders them); the Android app cannot render it")
    return fmt


def _renders_as(fmt: dict, tokenizer, chats: list[list[tuple[str, str]]]) -> bool:
    for chat in chats:
        msgs = [{"role": r, "content": c} for r, c in chat]
        for gen in (True, False):
            if format_chat(fmt, msgs, gen) != tokenizer.render_chat(msgs, add_generation_prompt=gen):
                return False
    return True


def format_chat(fmt: dict, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """What the app does with chat_format's record (android_demo ChatFormat.kt is the same)."""
    out = [fmt["first_system"]] if messages and messages[0]["role"] != "system" else []
    for m in messages:
        before, after = fmt["roles"][m["role"]]
        out += [before, m["content"].strip() if fmt.get("strip_content") else m["content"], after]
    return "".join(out) + (fmt["generation_prompt"] if add_generation_prompt else "")


def export_android(bundle_path: str | os.PathLike) -> dict:
    """Add android.onnx (+ android.onnx.data) and backends.android to a bundle; returns that record.
    The manifest is replaced in one rename after the new files are complete and checksummed."""
    bundle = read_bundle(bundle_path)
    folder = bundle.path
    spec = bundle.manifest["backends"].get("onnx")
    if spec is None:
        raise BundleError(f"{folder}: the bundle has no ONNX graph to rewrite")
    if bundle.manifest.get("flash") or bundle.manifest.get("vocab_map"):
        raise BundleError(f"{folder}: flash-store and draft bundles have no Android graph yet; export a plain bundle")
    cfg = dict(bundle.config, num_layers=spec["kv_cache"]["layers"], num_kv_heads=spec["kv_cache"]["num_kv_heads"],
               head_dim=spec["kv_cache"]["head_dim"])
    model = onnx.load(os.fspath(folder / spec["graph"]), load_external_data=False)
    vocab = bundle.logits_width() or int(cfg["vocab_size"])
    fmt = chat_format(load_tokenizer(folder))

    rw = _Rewriter(model, folder, cfg)
    rw.run()
    inputs, outputs, signature = _signature(cfg, vocab)
    graph = helper.make_graph(rw.nodes, model.graph.name + ".android", inputs, outputs)
    used = {i for n in rw.nodes for i in n.input}
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    large = [t for t in rw.new_inits if len(t.raw_data) >= 1024]  # small constants stay inline (shape inference reads them)
    _write_external(large, folder / (DATA + ".partial"))
    for t in large:
        for e in t.external_data:
            if e.key == "location":
                e.value = DATA
    graph.initializer.extend(rw.new_inits)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                            producer_name="ondevice.export_android")
    out.ir_version = IR_VERSION
    onnx.save(out, os.fspath(folder / (GRAPH + ".partial")))
    if {GRAPH, DATA} & set(bundle.manifest["files"]) or "android" in bundle.manifest["backends"]:
        # an earlier export: drop it from the manifest before its files change, so that a kill between
        # the renames below and the new manifest leaves a bundle whose checksums still match
        earlier = dict(bundle.manifest, backends={k: v for k, v in bundle.manifest["backends"].items()
                                                  if k != "android"},
                       files={k: v for k, v in bundle.manifest["files"].items() if k not in (GRAPH, DATA)})
        _replace_manifest(folder, earlier)
    for name in (DATA, GRAPH):
        os.replace(folder / (name + ".partial"), folder / name)

    record = {"graph": GRAPH, "data": DATA, "runtime": "onnxruntime", "ort_api": ORT_API, "opset": OPSET,
              **signature,
              "kv_cache": {"layers": cfg["num_layers"], "num_kv_heads": cfg["num_kv_heads"],
                           "head_dim": cfg["head_dim"], "layout": "[1, kv_heads, capacity, head_dim] per layer, read "
                           "only; the caller writes new_key/new_value [1, kv_heads, T, head_dim] at past_length"},
              "vocab_size": vocab, "chat_format": fmt}
    manifest = dict(bundle.manifest)
    manifest["backends"] = dict(manifest["backends"], android=record)
    files = dict(manifest["files"])
    for name in (GRAPH, DATA):
        p = folder / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest["files"] = files
    _replace_manifest(folder, manifest)
    return record


def _replace_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json in one rename (a temporary file first, synced)."""
    for stale in folder.glob(".manifest.*"):  # left by an export that was killed before its rename
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MANIFEST)
