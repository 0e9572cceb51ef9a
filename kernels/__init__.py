"""Triton kernels of rsmim, one op per file, each with its torch reference and a benchmark.

- `kernels.hog`: fused HOG patch scoring (SelectiveMAE's patch ranking, MaskFeat features).
- `kernels.attention`: FlashAttention-2 style attention with a per-sample key mask.

This file also holds the offline performance record that both ops' `--sass` flag prints (no GPU
needed): `capture_launches` runs an op's host code on CPU tensors with its kernels replaced by
recorders, `compile_like_jit` compiles each recorded launch for sm_90 exactly as the JIT would on
that GPU (same argument specialisation: integers equal to 1 become constants, integers and pointers
divisible by 16 are marked so, hence the same vectorisation and pipelining), and `sass_stats` reads
the cubin with the nvdisasm / cuobjdump that triton ships.
"""
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager


@contextmanager
def capture_launches(module, names):
    """Within the block, `module.<name>[grid](*args, **kwargs)` records (jit function, args, kwargs)
    in the yielded list instead of launching; the real kernels are put back on exit."""
    launches = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    saved = {name: getattr(module, name) for name in names}
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(fn))
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def compile_like_jit(fn, args, kwargs, arch=90):
    """`fn[grid](*args, **kwargs)` compiled for CUDA sm_<arch> without a GPU: the JIT's own binder
    derives the signature, constants and divisibility attributes from the real arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _nvidia_tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\(\s*(\.L_x_\d+)\s*\)")


def _sass_counts(ops):
    """Counts of the instruction classes that the performance record follows."""
    def n(*prefixes):
        return sum(op.startswith(prefixes) for op in ops)
    return dict(instrs=len(ops), mma=n("HGMMA", "HMMA"), async_copy=n("LDGSTS", "UTMALDG"),
                shared_st=n("STS"), shared_ld=n("LDS"), bar=n("BAR.SYNC", "BAR.RED", "BAR.ARV"),
                atomic=n("RED", "ATOM"), spill=n("LDL", "STL"))


def sass_stats(compiled):
    """Resource use and SASS instruction counts of a compiled kernel.

    Returns regs, shared (bytes, dynamic), local (spill bytes), the whole kernel's counts
    (`_sass_counts`), and `loop`: the counts of the hottest loop - the innermost backward branch
    that holds matrix-product instructions, else the longest one - or None without a loop (every
    count then is per program). `dots` counts tt.dot ops in the TTGIR (matrix products per tile)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    res = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ops, labels, branches = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        instr = _INSTR.match(line)
        if instr:
            target = _BRANCH.search(instr.group(2)) if instr.group(1).startswith("BRA") else None
            if target:
                branches.append((len(ops), target.group(1)))
            ops.append(instr.group(1))
    # Backward branches; a branch to itself is the trap after EXIT, not a loop.
    loops = [(labels[t], i + 1) for i, t in branches if t in labels and labels[t] < i]
    loop = None
    if loops:
        # Innermost first (shortest), preferring loops that hold matrix products.
        loops.sort(key=lambda se: (_sass_counts(ops[se[0]:se[1]])["mma"] == 0, se[1] - se[0]))
        loop = _sass_counts(ops[loops[0][0]:loops[0][1]])
    ttgir = compiled.asm["ttgir"]
    dots = len(re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot) ", ttgir))
    return dict(regs=int(res.get("REG", 0)), shared=compiled.metadata.shared, local=int(res.get("LOCAL", 0)),
                warps=compiled.metadata.num_warps, stages=compiled.metadata.num_stages, dots=dots,
                convert_layout=ttgir.count("ttg.convert_layout"), kernel=_sass_counts(ops), loop=loop)
