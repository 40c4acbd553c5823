"""`./launch.sh convert SOURCE DEST --to {diffusers,safetensors,wan} [--ema]` — arrives with issue [convert].

Until then stage folders already hold diffusers folders (`transformer/`, `transformer_ema/`) that
`WanTransformer3DModel.from_pretrained` loads as they are.
"""

import sys

if __name__ == "__main__":
    print("error: convert is not available yet (issue [convert]); stage folders already contain diffusers "
          "folders transformer/ and transformer_ema/", file=sys.stderr)
    sys.exit(2)
