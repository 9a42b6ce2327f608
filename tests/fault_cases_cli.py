"""Probe cases: the command line and the pipelines (issue 30)."""

NANO = "$TREE/checkpoints/nano"
# run CMD...: its output to log, the last line that is not a progress bar printed, its exit code returned
RUN = 'run() { "$@" > log 2>&1; rc=$?; grep -v "^\\s*$" log | grep -v "denoising\\|it/s\\]" | tail -1; return $rc; }; '

CASES = [
    (
        "demo --out EXISTING.png (generate refuses an existing --out)",
        RUN
        + "echo keep > mine.png; run $PY -m qwenimage_minimal demo --random --out mine.png --steps 1 --height 32 --width 32; rc=$?; "
        'grep -q keep mine.png && echo "## mine.png kept" || echo "## mine.png replaced"; exit $rc',
    ),
    (
        "generate --model checkpoints/nano with no sampling flag",
        RUN
        + f'run timeout 60 $PY -m qwenimage_minimal generate --model {NANO} --prompt "a large red circle at the top left" --out x.png; rc=$?; '
        "$PY -c \"from PIL import Image; print('## picture', Image.open('x.png').size)\" 2>/dev/null || echo \"## no picture after 60 s (1328², 50 steps)\"; exit $rc",
    ),
    (
        "generate --seed 2**64",
        RUN
        + "run $PY -m qwenimage_minimal generate --model $FIX/tiny --prompt x --height 32 --width 32 --steps 1 --seed 18446744073709551616 --out x.png",
    ),
    (
        "generate --scheduler lightning without a Lightning LoRA, 50 steps, CFG 4",
        RUN
        + "run $PY -m qwenimage_minimal generate --model $FIX/tiny --prompt x --height 32 --width 32 --steps 50 --cfg 4 --scheduler lightning --out x.png; rc=$?; "
        'grep -c "Warning" log | sed "s/^/## warnings: /"; exit $rc',
    ),
    (
        "python -m qwenimage_minimal --help lists train-nano among the commands",
        '$PY -m qwenimage_minimal --help > log; grep "{" log | head -1 > commands; grep -q "train-nano" commands && echo "## train-nano listed" || echo "## train-nano missing"; cat commands',
    ),
    (
        "a pipeline whose latents end NaN (weights loaded with check_finite=False, then NaN)",
        RUN
        + 'cat > nan.py <<PY\nimport numpy as np, torch\nfrom qwenimage_minimal import pipeline\npipe = pipeline.QwenImagePipeline.from_pretrained("$FIX/tiny")\n'
        'pipe.transformer.proj_out.bias.data.fill_(float("nan"))\nimg = pipe(prompt="x", height=32, width=32, num_inference_steps=1, progress=False).images[0]\n'
        'print("returned a picture, max pixel", np.asarray(img).max())\nPY\nrun $PY nan.py',
    ),
    (
        "generate --lora FILE on an fp8 folder: which diagnosis, and when",
        RUN
        + "$PY $TREE/weights_convert.py $FIX/tiny/transformer fp8/transformer --dtype fp8 > /dev/null 2>&1; "
        "for c in tokenizer text_encoder vae scheduler model_index.json; do cp -r $FIX/tiny/$c fp8/; done; "
        "run $PY -m qwenimage_minimal generate --model fp8 --prompt x --height 32 --width 32 --steps 1 --lora $FIX/lora.safetensors --out x.png",
    ),
]
