"""Issue 30, the training side: one bash script per case, run by fault_probe.py against the old tree and the new.

Every script uses the command line only ($PY -m qwenimage_minimal train / train-nano, $PY -c with names both
trees have), so the same text runs on both; effects are echoed after `## `. `say CMD` runs the command under
test, prints the last line it wrote and keeps its exit code, which the script exits with."""

# say: run the command under test, print its last line (progress bars' \r split), keep its exit code in $rc
# (warnings and progress-bar lines are not what a command said last)
SAY = """say() {
  "$@" > said.txt 2>&1; rc=$?
  tr '\\r' '\\n' < said.txt | grep -v -E '^[[:space:]]*$|Warning|tracemalloc|warnings.warn|[0-9]+/[0-9]+ \\[' | tail -1
}
"""
# A 2-step LoRA run of the tiny model on the four pictures (about 5 s); flags given after it override its own
T = (
    "$PY -m qwenimage_minimal train --model $FIX/tiny --data $FIX/data --resolution 64 --mixed_precision no "
    "--max_train_steps 2 --device cpu"
)
NANO = "timeout 20 $PY -m qwenimage_minimal train-nano --quick"


def case(label: str, body: str) -> tuple[str, str]:
    return label, SAY + body + "exit $rc\n"


CASES = [
    # 1. train-nano's work folder
    case(
        "1a train-nano --out holding a user's files",
        f"""mkdir -p nano/data && echo precious > nano/data/mine.txt
say {NANO} --out nano
test -f nano/data/mine.txt && echo "## user file kept" || echo "## user file deleted"
""",
    ),
    case(
        "1b train-nano --out holding a finished model",
        f"""mkdir -p nano/model nano/data nano/run && echo '{{}}' > nano/model/report.json && touch nano/.train-nano
say {NANO} --out nano
test -f nano/model/report.json && echo "## finished model kept" || echo "## finished model deleted"
""",
    ),
    case(
        "1c train-nano --out FILE",
        f"""echo x > afile
say {NANO} --out afile
echo "## traceback: $(grep -c Traceback said.txt)"
""",
    ),
    # 2. train --out
    case(
        "2a train --out holding a finished run's lora.safetensors",
        f"""mkdir run && echo "an earlier run's LoRA" > run/lora.safetensors
say {T} --out run
grep -q earlier run/lora.safetensors && echo "## earlier LoRA kept" || echo "## earlier LoRA overwritten"
""",
    ),
    case(
        "2b train --out equal to --data",
        f"""cp -r $FIX/data data
say {T} --data data --out data
test -f data/loss.png && echo "## loss.png written into --data (the next run reads it as a picture)" || echo "## --data untouched"
""",
    ),
    # 3. a SIGKILLed cache write
    case(
        "3 stale .partial temp file in the cache",
        f"""mkdir -p run/cache && echo junk > run/cache/.0123abcd.safetensors.k1ll3d.partial
touch -d '2 hours ago' run/cache/.0123abcd.safetensors.k1ll3d.partial
say {T} --out run
ls -a run/cache | grep -q partial && echo "## stale temp file left" || echo "## stale temp file removed"
""",
    ),
    # 4. numbers
    case(
        "4a --prior_loss_weight -1",
        f"""say {T} --out run --with_prior_preservation --class_data_dir $FIX/data --class_prompt "a square" --prior_loss_weight -1
test -f run/lora.safetensors && echo "## trained (maximising the prior loss)" || echo "## nothing trained"
""",
    ),
    case(
        "4b --logit_mean nan",
        f"""say {T} --out run --weighting_scheme logit_normal --logit_mean nan
test -f run/lora.safetensors && echo "## trained (every step at sigma = 1)" || echo "## nothing trained"
""",
    ),
    case(
        "4c --lora_alpha inf",
        f"""say {T} --out run --lora_alpha inf
ls -d run/checkpoint-* >/dev/null 2>&1 && echo "## a checkpoint exists" || echo "## no checkpoint exists"
""",
    ),
    case(
        "4d --max_grad_norm inf",
        f"""say {T} --out run --max_grad_norm inf
test -f run/lora.safetensors && echo "## trained" || echo "## nothing trained"
""",
    ),
    case(
        "4e --adam_weight_decay inf",
        f"""say {T} --out run --adam_weight_decay inf
test -f run/lora.safetensors && echo "## trained" || echo "## nothing trained"
""",
    ),
    case(
        "4f --mode_scale nan",
        f"""say {T} --out run --weighting_scheme mode --mode_scale nan
test -f run/lora.safetensors && echo "## trained" || echo "## nothing trained"
""",
    ),
    case(
        "4g --seed 2**64",
        f"""say {T} --out run --seed 18446744073709551616
test -d run/cache && echo "## the cache was built first" || echo "## refused before any work"
""",
    ),
    case(
        "4h --resolution 65536 --square",
        f"""SECONDS=0; say timeout 20 {T} --out run --resolution 65536 --square
echo "## stopped after $SECONDS s"
""",
    ),
    case(
        "4i resume at step >= --max_train_steps",
        f"""{T} --out run >/dev/null 2>&1
say {T} --out run --resume_from_checkpoint latest
""",
    ),
    # 5. data
    case(
        "5a empty caption file",
        f"""cp -r $FIX/data data && : > data/red.txt
say {T} --data data --out run
test -f run/lora.safetensors && echo "## trained red.png on the empty prompt" || echo "## nothing trained"
""",
    ),
    case(
        "5b 1x1 picture",
        f"""cp -r $FIX/data data && echo "a dot" > data/dot.txt
$PY -c "from PIL import Image; Image.new('RGB', (1, 1), (255, 0, 0)).save('data/dot.png')"
say {T} --data data --out run
test -f run/lora.safetensors && echo "## trained dot.png enlarged to 64x64" || echo "## nothing trained"
""",
    ),
    # 6. validation's negative prompt, CFG and steps
    case(
        "6a validation settings from the model's pipeline_defaults.json",
        f"""cp -r $FIX/tiny m
echo '{{"true_cfg_scale": 2.0, "negative_prompt": "", "num_inference_steps": 3}}' > m/pipeline_defaults.json
say {T} --model m --out run --validation_prompt "a red square"
$PY -c "import json, pathlib; c = json.loads(pathlib.Path('run/train_config.json').read_text()); print('## validation: cfg', c.get('validation_cfg'), 'steps', c.get('validation_inference_steps'), 'negative', repr(c.get('validation_negative_prompt')))"
""",
    ),
    case(
        "6b --validation_negative_prompt ''",
        f"""say {T} --out run --validation_prompt "a red square" --validation_inference_steps 2 --validation_negative_prompt ""
""",
    ),
    # 7. --help
    case(
        "7 train --help",
        """$PY -m qwenimage_minimal train --help > help.txt 2>&1; rc=$?
echo "## argparse's dict printed: $(grep -c option_strings help.txt); '(default: None)': $(tr -s ' \\n' ' ' < help.txt | grep -o '(default: None)' | wc -l)"
""",
    ),
    # 8. what training says
    case(
        "8 progress: summary, cache bar, final validation, result",
        f"""say {T} --out run --validation_prompt "a red square" --validation_inference_steps 2
grep -q "trainable parameters" said.txt && echo "## start-up summary" || echo "## no start-up summary"
tr '\\r' '\\n' < said.txt | grep caching | tail -1 | grep -q " 4/4 " && echo "## cache bar counts images" || echo "## cache bar counts chunks"
grep -q "final weights" said.txt && echo "## final validation announced" || echo "## final validation silent"
""",
    ),
    # 9. a moved dataset
    case(
        "9 resume after the data folder moved",
        f"""cp -r $FIX/data d1 && {T} --data d1 --out run >/dev/null 2>&1 && mv d1 d2
say {T} --data d2 --out run --max_train_steps 3 --resume_from_checkpoint latest
ls -d run/checkpoint-3 >/dev/null 2>&1 && echo "## resumed to step 3" || echo "## not resumed"
""",
    ),
    # 10. one clear sentence
    case(
        "10a truncated training_state.safetensors",
        f"""{T} --out run >/dev/null 2>&1 && truncate -s 200 run/checkpoint-2/training_state.safetensors
say {T} --out run --max_train_steps 3 --resume_from_checkpoint latest
""",
    ),
    case(
        "10b truncated cache files",
        f"""{T} --out run >/dev/null 2>&1 && for f in run/cache/*.safetensors; do truncate -s 300 $f; done
say {T} --out run2 --embeddings_cache run/cache
""",
    ),
    case(
        "10c trainer_state.json step 'x'",
        f"""{T} --out run >/dev/null 2>&1
$PY -c "import json, pathlib; p = pathlib.Path('run/checkpoint-2/trainer_state.json'); s = json.loads(p.read_text()); s['step'] = 'x'; p.write_text(json.dumps(s))"
say {T} --out run --max_train_steps 3 --resume_from_checkpoint latest
""",
    ),
    case(
        "10d trainer_state.json not an object",
        f"""{T} --out run >/dev/null 2>&1 && echo '[1, 2]' > run/checkpoint-2/trainer_state.json
say {T} --out run --max_train_steps 3 --resume_from_checkpoint latest
""",
    ),
    case(
        "10e --config with learning_rate null",
        f"""echo '{{"learning_rate": null}}' > settings.json
say {T} --out run --config settings.json
""",
    ),
    case(
        "10f --device cuda without CUDA",
        f"""say {T} --out run --device cuda
test -d run/cache && echo "## the cache was built first" || echo "## refused before any work"
""",
    ),
    case(
        "10g --finetune full on an fp8 transformer",
        f"""cp -r $FIX/tiny m8 && rm -r m8/transformer
$PY $TREE/weights_convert.py $FIX/tiny/transformer m8/transformer --dtype fp8 >/dev/null 2>&1
say {T} --model m8 --out run --finetune full
""",
    ),
    case(
        "10h LoRA on an fp8 transformer",
        f"""cp -r $FIX/tiny m8 && rm -r m8/transformer
$PY $TREE/weights_convert.py $FIX/tiny/transformer m8/transformer --dtype fp8 >/dev/null 2>&1
say {T} --model m8 --out run
test -f run/lora.safetensors && echo "## a LoRA was trained on the fp8 weights" || echo "## nothing trained"
""",
    ),
]
