"""Make the Triton CPU interpreter treat bfloat16 as the GPU does, in the two places our kernels rely on.

1. fp32 -> bf16 casts: the interpreter truncates (``_convert_float`` with no rounding mode); the GPU's
   ``cvt.rn.bf16.f32`` rounds to nearest even, as torch does. Truncation is one ulp off for about half of all
   values, which would make every bf16 kernel test either fail or need a tolerance loose enough to hide bugs.
2. ``tl.dot``: bfloat16 is stored as uint16 bit patterns and ``create_dot`` multiplies those patterns (results
   ~1e10 for inputs in [-2, 2]; triton-lang/triton#11584, closed: "we just don't support it yet"). The fix
   widens bf16 operands to float32 (exact: the bits shifted left by 16), which is what an mma with fp32
   accumulation computes: exact products, fp32 sums. Without it the bf16 attention tests could not run.
The kernels do no other arithmetic on bf16 values (they cast to fp32 first), so nothing else is patched.
Both fixes apply only while the interpreter is on (TRITON_INTERPRET=1), once, from kernels/__init__.py.
"""
from __future__ import annotations

import os

_PATCHED_FLAG = "_qwen2_triton_bf16_dot"


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def patch_interpreter_bf16() -> bool:
    """Install both fixes when the interpreter is active. Returns True when they are (now) in place."""
    if not interpreter_active():
        return False
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original = builder_cls.create_dot
    original_cast = builder_cls.cast_impl
    if getattr(original, _PATCHED_FLAG, False):
        return True

    def cast_impl(self, src, dst_type):
        if src.get_element_ty() == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            out = np.where(is_nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded).astype(np.uint16)
            return interpreter.TensorHandle(out, tl.bfloat16)
        return original_cast(self, src, dst_type)

    def widen(h):
        if h.get_element_ty() == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    setattr(create_dot, _PATCHED_FLAG, True)
    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    return True
