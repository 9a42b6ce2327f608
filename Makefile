# Every target works on a fresh clone: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch
# pulled in by another package would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: test lint format demo grade capstone capstone-pieces capstone-lora student nano nano-edit nano-brown bench notebooks course cuda-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,notebooks]"
	touch $@

# The whole test suite on CPU: parity against diffusers, loading, conversion, notebooks. --durations lists the
# 20 slowest tests at the end, so a CI log says where its minutes went (the guide's limit is ~15 minutes).
test: $(VENV)/.installed lint
	$(PY) -m pytest -q -m "not cuda" --durations=20 tests

# ruff, configured in pyproject.toml: the linter, and the formatter's check (`make format` applies it).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The main job: text-to-image, stage by stage. Without MODEL: the nano model committed in checkpoints/nano
# (trained from scratch by `make nano`) draws a grid of scene prompts on the CPU -> out/demo.png (replaced);
# MODEL=/path/to/Qwen-Image runs the real weights.
demo: $(VENV)/.installed
	$(PY) -m qwenimage_minimal demo --overwrite $(if $(MODEL),--model "$(MODEL)")

# The course's assignments (assignments/README.md): grade your functions against the package and diffusers, all
# or one lesson (LESSON=02); ASSIGNMENTS=assignments/solutions grades the reference solutions.
grade: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider $(if $(LESSON),assignments/grader/test_$(LESSON)_*.py,assignments/grader)

# The capstones (assignments/capstone.py): your pieces drawing the nano model's demo grid, scored beside the package's
# (-> out/capstone/pieces.png), and a LoRA trained with your lora_forward (~2 CPU minutes; -> out/capstone/lora.*).
# ASSIGNMENTS=assignments/solutions runs the reference solutions.
capstone: capstone-pieces capstone-lora

capstone-pieces: $(VENV)/.installed
	$(PY) assignments/capstone.py pieces $(if $(ASSIGNMENTS),--assignments "$(ASSIGNMENTS)")

capstone-lora: $(VENV)/.installed
	$(PY) assignments/capstone.py lora $(if $(ASSIGNMENTS),--assignments "$(ASSIGNMENTS)")

# The student edition: the lessons without outputs or answers and the assignments without solutions -> out/student
student: $(VENV)/.installed
	$(PY) assignments/student_edition.py --out out/student

# The nano model from scratch on this machine (nano/recipe.py): scenes, the VAE, the MMDiT, held-out scores -> out/nano
# (~70 CPU minutes). out/nano/model is what checkpoints/nano holds; a finished one is kept unless OVERWRITE=1.
nano: $(VENV)/.installed
	$(PY) -m qwenimage_minimal train-nano --out out/nano $(if $(OVERWRITE),--overwrite)

# The nano Edit model (nano/edit_recipe.py): edit pairs -> the nano model fine-tuned by train.py's Edit path ->
# out/nano_edit (~30 CPU minutes). out/nano_edit/model is what checkpoints/nano_edit holds.
nano-edit: $(VENV)/.installed
	$(PY) -m qwenimage_minimal train-nano-edit --out out/nano_edit $(if $(OVERWRITE),--overwrite)

# The brown LoRA (nano/brown.py): 32 pictures of brown objects -> `train` -> out/brown/lora.safetensors, measured
# (what checkpoints/nano_brown_lora.safetensors holds; a few CPU minutes). MODEL=out/nano/model for your own build.
nano-brown: $(VENV)/.installed
	$(PY) -m qwenimage_minimal.nano.brown --out out/brown $(if $(MODEL),--model "$(MODEL)") $(if $(OVERWRITE),--overwrite)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_mmdit.py
	$(PY) benchmarks/bench_text_encoder.py
	$(PY) benchmarks/bench_vae.py
	$(PY) benchmarks/bench_vision.py
	$(PY) benchmarks/bench_edit.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_lora.py
	$(PY) benchmarks/bench_train.py

# Re-executes every notebook in place, so the committed outputs are current.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

# The instructor's edition, executed: every notebook run into out/notebooks/ with its solutions and answers (the
# committed ones are left alone). Students work in the student edition instead (make student -> out/student/).
course: $(VENV)/.installed
	mkdir -p out/notebooks && cp notebooks/course.py out/notebooks/
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --output-dir out/notebooks notebooks/*.ipynb

# Needs a CUDA GPU and a Python with CUDA torch + diffusers (PYTHON=...); never part of CI.
cuda-check:
	PYTHON=$(PYTHON) bash benchmarks/cuda_check.sh

clean:
	rm -rf $(VENV) .pytest_cache out
