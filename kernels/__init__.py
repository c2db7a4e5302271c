"""kernels: one module per op (Triton kernel, host launcher, plain-torch reference side by side)."""
from qwen2_triton.kernels.interpreter_compat import patch_interpreter_bf16

# Under TRITON_INTERPRET=1 (CPU tests) make the interpreter round and multiply bf16 as the GPU does; no-op
# otherwise. See kernels/interpreter_compat.py for the two upstream interpreter gaps this covers.
patch_interpreter_bf16()
