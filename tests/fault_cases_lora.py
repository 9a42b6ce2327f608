"""Issue 30, LoRA / fp8 / converter cases: (label, bash script). Each runs in an empty folder with $PY,
$TREE, $FIX (see fault_probe.py); effects are echoed after '## '. Only the command line, the converter and
public names that exist before and after the fix are used."""

import shlex

# Write ./bad.safetensors: $FIX/lora.safetensors (diffusers format, its PEFT header kept) changed by the
# Python statements in $CHANGE, which see `t` (name -> tensor), `meta` (the header) and `torch`.
BAD_LORA = r"""
bad_lora() {
$PY - "$1" <<'PYEOF'
import json, os, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
path = os.environ["FIX"] + "/lora.safetensors"
with safe_open(path, "pt") as f:
    t = {k: f.get_tensor(k) for k in f.keys()}
    meta = dict(f.metadata() or {})
first = sorted(k for k in t if k.endswith("lora_B.weight"))[0]
firstA = first.replace("lora_B", "lora_A")
module = first[: -len(".lora_B.weight")]
exec(sys.argv[1])
save_file(t, "bad.safetensors", metadata=meta)
PYEOF
}
"""

GENERATE = r"""
generate() {  # generate --lora "$1" with the tiny model; then what the picture holds
rm -f x.png
$PY -m qwenimage_minimal generate --model "${2:-$FIX/tiny}" --prompt x --height 64 --width 64 --steps 2 --device cpu --lora "$1" --out x.png
rc=$?
if [ -f x.png ]; then
  $PY -c "from PIL import Image; import numpy as np; a=np.asarray(Image.open('x.png')); print('## picture written, max', a.max(), '(all black)' if a.max() == 0 else '')"
else
  echo "## no picture written"
fi
return $rc
}
"""

PRELUDE = BAD_LORA + GENERATE


def lora_value_case(change: str) -> str:
    return PRELUDE + f"bad_lora {shlex.quote(change)}\ngenerate bad.safetensors\n"


CASES = [
    # 1. LoRA values
    (
        "lora: NaN in lora_B (--lora FILE)",
        lora_value_case("t[first] = t[first].clone(); t[first].view(-1)[0] = float('nan')"),
    ),
    (
        "lora: Inf in lora_A (--lora FILE)",
        lora_value_case("t[firstA] = t[firstA].clone(); t[firstA].view(-1)[0] = float('inf')"),
    ),
    (
        "lora: integer lora_B (--lora FILE)",
        lora_value_case("t[first] = torch.ones_like(t[first], dtype=torch.int64)"),
    ),
    (
        "lora: NaN .alpha tensor (--lora FILE)",
        lora_value_case("t[module + '.alpha'] = torch.tensor(float('nan'))"),
    ),
    (
        "lora: alpha 0 in the PEFT header (--lora FILE)",
        lora_value_case(
            "m = json.loads(meta['lora_adapter_metadata']); m['transformer.lora_alpha'] = 0; "
            "meta['lora_adapter_metadata'] = json.dumps(m)"
        ),
    ),
    (
        "lora: alpha -4 (.alpha tensor) (--lora FILE)",
        lora_value_case("t[module + '.alpha'] = torch.tensor(-4.0)"),
    ),
    ("lora: --lora FILE:1e30", PRELUDE + 'generate "$FIX/lora.safetensors:1e30"\n'),
    (
        "lora: load_lora_weights(scale=1e30), set_adapters(weight 1e30)",
        r"""$PY - <<'PYEOF'
import os
from qwenimage_minimal import pipeline
pipe = pipeline.QwenImagePipeline.from_pretrained(os.environ["FIX"] + "/tiny")
for what, call in (
    ("load_lora_weights(scale=1e30)", lambda: pipe.load_lora_weights(os.environ["FIX"] + "/lora.safetensors", adapter_name="a", scale=1e30)),
    ("set_adapters([a], [1e30])", lambda: (pipe.load_lora_weights(os.environ["FIX"] + "/lora.safetensors", adapter_name="b"), pipe.set_adapters(["b"], [1e30]))),
):
    try:
        call()
        print("##", what, "accepted")
    except ValueError as e:
        print("##", what, "refused")
        print(e)
PYEOF
""",
    ),
    (
        "converter: --component lora of a LoRA with NaN in lora_B",
        PRELUDE
        + r"""bad_lora "t[first] = t[first].clone(); t[first].view(-1)[0] = float('nan')"
$PY $TREE/weights_convert.py bad.safetensors out.safetensors --component lora; rc=$?
[ -f out.safetensors ] && echo "## out.safetensors written" || echo "## nothing written"
exit $rc
""",
    ),
    (
        "converter: --merge-lora of a LoRA with NaN in lora_B",
        PRELUDE
        + r"""bad_lora "t[first] = t[first].clone(); t[first].view(-1)[0] = float('nan')"
$PY $TREE/weights_convert.py $FIX/tiny/transformer merged --merge-lora bad.safetensors; rc=$?
[ -d merged ] && echo "## merged/ written" || echo "## nothing written"
exit $rc
""",
    ),
    (
        "converter: --merge-lora FILE:1e30",
        r"""$PY $TREE/weights_convert.py $FIX/tiny/transformer merged --merge-lora $FIX/lora.safetensors:1e30; rc=$?
[ -d merged ] && echo "## merged/ written" || echo "## nothing written"
exit $rc
""",
    ),
    # 2. One sentence instead of a traceback
    (
        "lora: lora_adapter_metadata that is not JSON",
        lora_value_case("meta['lora_adapter_metadata'] = '{not json'"),
    ),
    (
        "lora: lora_adapter_metadata a JSON list",
        lora_value_case("meta['lora_adapter_metadata'] = '[4, 4]'"),
    ),
    (
        "lora: an empty (0-element) .alpha tensor",
        lora_value_case("t[module + '.alpha'] = torch.zeros(0)"),
    ),
    (
        "converter: a transformer folder as --component vae",
        r"""$PY $TREE/weights_convert.py $FIX/tiny/transformer out --component vae; rc=$?
[ -d out ] && echo "## out/ written" || echo "## nothing written"
exit $rc
""",
    ),
    (
        "converter: a VAE folder as --component text_encoder",
        r"""$PY $TREE/weights_convert.py $FIX/tiny/vae out --component text_encoder; rc=$?
[ -d out ] && echo "## out/ written" || echo "## nothing written"
exit $rc
""",
    ),
    (
        "converter: a LoRA file as a transformer (no --component)",
        r"""$PY $TREE/weights_convert.py $FIX/lora.safetensors out; rc=$?
[ -d out ] && echo "## out/ written" || echo "## nothing written"
exit $rc
""",
    ),
    (
        "converter: a transformer folder as --component lora",
        r"""$PY $TREE/weights_convert.py $FIX/tiny/transformer out.safetensors --component lora; rc=$?
[ -f out.safetensors ] && echo "## out.safetensors written" || echo "## nothing written"
exit $rc
""",
    ),
    # 3. LoRA on an fp8 transformer
    (
        "lora on an fp8 transformer: --lora with an fp8 model folder",
        PRELUDE
        + r"""mkdir m && cp -r $FIX/tiny/* m/ && rm -r m/transformer
$PY $TREE/weights_convert.py $FIX/tiny/transformer m/transformer --dtype fp8 > /dev/null || exit 1
generate $FIX/lora.safetensors m
""",
    ),
    (
        "lora on an fp8 transformer: pipe.load_lora_weights",
        r"""mkdir m && cp -r $FIX/tiny/* m/ && rm -r m/transformer
$PY $TREE/weights_convert.py $FIX/tiny/transformer m/transformer --dtype fp8 > /dev/null || exit 1
$PY -c "
import os
from qwenimage_minimal import pipeline
pipe = pipeline.QwenImagePipeline.from_pretrained('m')
pipe.load_lora_weights(os.environ['FIX'] + '/lora.safetensors')
print('## LoRA loaded')
"
""",
    ),
    # 4. VAE latents_std
    (
        "vae: latents_std with a 0 in vae/config.json",
        PRELUDE
        + r"""mkdir m && cp -r $FIX/tiny/* m/
$PY -c "
import json, os
c = json.load(open(os.environ['FIX'] + '/tiny/vae/config.json')); c['latents_std'][3] = 0
json.dump(c, open('m/vae/config.json', 'w'))"
rm -f x.png
$PY -m qwenimage_minimal generate --model m --prompt x --height 64 --width 64 --steps 2 --device cpu --out x.png; rc=$?
if [ -f x.png ]; then
  $PY -c "from PIL import Image; import numpy as np; a=np.asarray(Image.open('x.png')); print('## picture written, max', a.max(), 'min', a.min())"
else
  echo "## no picture written"
fi
exit $rc
""",
    ),
]
