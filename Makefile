# Fine-tuning template. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXP    ?= digits
ARGS   ?=
CKPT   ?=
RUN    ?=
INPUT  ?=
TASK   ?= image
BACKBONE ?=
SEEDS  ?= 0 1 2
TASKS  ?= sst2 agnews squad ants_bees digits
# The newest backbone exported by `make pretrain TASK=...` (what `make finetune` and `make compare` start from).
NEWEST_BACKBONE = $(or $(BACKBONE),$(shell ls -dt runs/pretrain_$(TASK)/version_*/backbone 2>/dev/null | head -n 1))
CONFIG ?= configs/$(EXP).yaml
TRIALS ?= 12
FOLDS  ?= 5
CV     ?= 0
QUANTIZE ?=
NODES  ?=
NODE_RANK ?= 0
MASTER ?= 127.0.0.1
RUN_ID ?=
GPUS   ?=
TIME   ?=
PRESET ?= configs/presets/ddp.yaml
TEACHER ?=
DISTILL_FROM = $(if $(filter text,$(TASK)),text_sst2,digits)
# The best checkpoint (epochNN-acc*.ckpt) of the newest teacher run, unless TEACHER=<checkpoint> is given.
NEWEST_TEACHER = $(or $(TEACHER),$(shell ls -t runs/$(DISTILL_FROM)/version_*/checkpoints/epoch*.ckpt 2>/dev/null | head -n 1))

.PHONY: help install train test test-fast smoke lint format clean plan lr-find bench eval predict export sync \
	pretrain finetune compare recipes export-backbone fashion-mnist resume test-compat sweep cv distill torchrun slurm

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo ""
	@echo "  Variables: EXP=<config in configs/, default digits>  ARGS=\"<extra LightningCLI arguments>\""
	@echo "  Example:   make train EXP=image_folder ARGS=\"--data.data_dir ../shared/data/hymenoptera --trainer.max_epochs=2\""
	@echo "  After a run: make eval CKPT=runs/digits/version_0/checkpoints/last.ckpt (predict adds INPUT=...)"
	@echo "  Interrupted: make resume RUN=runs/digits/version_0"
	@echo "  Any config file: make train CONFIG=runs/sweeps/digits/best.yaml"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The extras too: ONNX export (`make export`, and its tests) and Hugging Face datasets (`data.hf_dataset`).
	$(PY) -m pip install --quiet -e ".[dev,export,hf]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project, its extras (export, hf) and dev tools (quick when done)

train: $(STAMP) ## Fine-tune and test the experiment configs/<EXP>.yaml (default: EfficientNet-Lite0 on digits, offline)
	@test -f $(CONFIG) || { echo "no experiment '$(EXP)': $(CONFIG) does not exist; choose one of: $$(ls configs/*.yaml | xargs -n1 basename | sed 's/\.yaml//' | grep -vx base | tr '\n' ' ')"; exit 2; }
	$(PY) scripts/train.py fit --config $(CONFIG) $(ARGS)

resume: $(STAMP) ## Continue RUN=runs/<exp>/version_N from its last.ckpt, in the same folder, metrics.csv and W&B run
	@test -n "$(RUN)" || { echo "give RUN=<run folder>, e.g. RUN=runs/digits/version_0"; exit 2; }
	@test -f $(RUN)/config.yaml || { echo "$(RUN) has no config.yaml: not a run folder"; exit 2; }
	$(PY) scripts/train.py fit --config $(RUN)/config.yaml --run $(RUN) $(ARGS)

pretrain: $(STAMP) ## Pre-train configs/pretrain_<TASK>.yaml (image: ResNet-18 from scratch on MNIST; text: MLM on chat lines)
	@test -f configs/pretrain_$(TASK).yaml || { echo "TASK is image or text, not '$(TASK)'"; exit 2; }
	$(PY) scripts/train.py fit --config configs/pretrain_$(TASK).yaml $(ARGS)

finetune: $(STAMP) ## Fine-tune configs/finetune_<TASK>.yaml from BACKBONE (default: the newest `make pretrain` export)
	@test -n "$(NEWEST_BACKBONE)" || { echo "no backbone under runs/pretrain_$(TASK)/: run make pretrain TASK=$(TASK) first, or give BACKBONE=<folder>"; exit 2; }
	$(PY) scripts/train.py fit --config configs/finetune_$(TASK).yaml --model.backbone_checkpoint $(NEWEST_BACKBONE) $(ARGS)

compare: $(STAMP) ## Fine-tune from BACKBONE and from scratch, same budget, SEEDS="0 1 2": table in runs/compare_<TASK>/
	@test -n "$(NEWEST_BACKBONE)" || { echo "no backbone under runs/pretrain_$(TASK)/: run make pretrain TASK=$(TASK) first, or give BACKBONE=<folder>"; exit 2; }
	$(PY) scripts/compare.py --config configs/finetune_$(TASK).yaml --backbone $(NEWEST_BACKBONE) --seeds $(SEEDS) --out runs/compare_$(TASK) $(ARGS)

torchrun: $(STAMP) ## This node's share of a multi-node run: NODES=2 NODE_RANK=0|1 MASTER=<node 0> RUN_ID=<same on all> [GPUS=n]
	$(PY) scripts/launch.py torchrun --nodes $(or $(NODES),1) --node-rank $(NODE_RANK) --master-addr $(MASTER) \
	  $(if $(RUN_ID),--run-id $(RUN_ID)) $(if $(GPUS),--procs-per-node $(GPUS)) -- --config $(CONFIG) --config $(PRESET) $(ARGS)

slurm: $(STAMP) ## Write runs/<exp>/<exp>.sbatch: NODES x GPUS, TIME=HH:MM:SS, requeued before the limit; SUBMIT=1 sbatches it
	$(PY) scripts/launch.py slurm $(if $(NODES),--nodes $(NODES)) $(if $(GPUS),--gpus-per-node $(GPUS)) $(if $(TIME),--time $(TIME)) \
	  $(if $(SUBMIT),--submit) -- --config $(CONFIG) --config $(PRESET) $(ARGS)

recipes: $(STAMP) ## Each default recipe vs a naive loop and from scratch, SEEDS, TASKS: runs/recipes/results.md
	$(PY) scripts/recipes.py --tasks $(TASKS) --seeds $(SEEDS) $(ARGS)

sweep: $(STAMP) ## Optuna search over configs/sweeps/<EXP>.yaml: TRIALS=12 [CV=K] [CONFIRM="0 1 2"], resumable; best.yaml
	@test -f configs/sweeps/$(EXP).yaml || { echo "no search space configs/sweeps/$(EXP).yaml (see configs/sweeps/digits.yaml)"; exit 2; }
	$(PY) scripts/sweep.py --config $(CONFIG) --space configs/sweeps/$(EXP).yaml --trials $(TRIALS) --cv $(CV) \
	  $(if $(CONFIRM),--confirm $(CONFIRM)) $(ARGS)

cv: $(STAMP) ## K-fold cross-validation of configs/<EXP>.yaml, FOLDS=5: per-fold table, mean ± sd, out-of-fold predictions
	$(PY) scripts/cv.py --config $(CONFIG) --folds $(FOLDS) $(ARGS)

distill: $(STAMP) ## Distil TEACHER (default: newest runs/digits; TASK=text: runs/text_sst2) into a small student
	@test -n "$(NEWEST_TEACHER)" || { echo "no teacher under runs/$(DISTILL_FROM)/: run make train EXP=$(DISTILL_FROM) first, or give TEACHER=<checkpoint>"; exit 2; }
	$(PY) scripts/train.py fit --config configs/distill_$(if $(filter text,$(TASK)),sst2,digits).yaml --model.teacher $(NEWEST_TEACHER) $(ARGS)

export-backbone: $(STAMP) ## Export the backbone of CKPT=<checkpoint> for fine-tuning (safetensors + metadata)
	@test -n "$(CKPT)" || { echo "give CKPT=<path to a .ckpt file of a run>"; exit 2; }
	$(PY) scripts/export_backbone.py $(CKPT) $(ARGS)

fashion-mnist: ## Install Fashion-MNIST (Debian package dataset-fashion-mnist) for --data.source fashion_mnist
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist; else sudo apt-get install -y dataset-fashion-mnist; fi; }

test: $(STAMP) ## Run the whole test suite (CPU, offline; includes the tests marked slow)
	$(PY) -m pytest

COMPAT_VENV := .venv-compat
LIGHTNING_PREVIOUS ?= 2.5.*
test-compat: $(STAMP) ## The resume, freezing and LR-schedule tests on the previous Lightning minor (lightning==2.5.*)
	@test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	@# Everything but Lightning comes from .venv (a second torch would be GBs): its site-packages on the path.
	@$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(COMPAT_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-deps "lightning==$(LIGHTNING_PREVIOUS)" "pytorch-lightning==$(LIGHTNING_PREVIOUS)"
	$(COMPAT_VENV)/bin/python -c "import lightning; print('lightning', lightning.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest tests/test_resume.py tests/test_unfreezing.py tests/test_lr_schedule.py

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest -m "not slow"

smoke: $(STAMP) ## One batch of train/val/test through configs/<EXP>.yaml (fast_dev_run)
	$(PY) scripts/train.py fit --config $(CONFIG) --trainer.fast_dev_run=true $(ARGS)

lint: $(STAMP) ## Check style with ruff (lint and format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## Format and fix with ruff
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean: ## Remove everything the template writes: runs, checkpoints, caches, benchmark results and the virtual environments
	rm -rf runs lightning_logs wandb checkpoints .cache bench/results.md bench/results.json build \
	  .pytest_cache .ruff_cache $(VENV) $(COMPAT_VENV) *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

plan: $(STAMP) ## Print the fine-tuning plan of configs/<EXP>.yaml (phases, groups, trainable, LR) without training
	$(PY) scripts/plan.py --config $(CONFIG) $(ARGS)

lr-find: $(STAMP) ## Run Lightning's LR finder on configs/<EXP>.yaml; prints the suggestion, saves the plot as PNG
	$(PY) scripts/lr_find.py --config $(CONFIG) $(ARGS)

bench: $(STAMP) ## Benchmarks side by side, as ratios (~15 min on 2 cores): bench/results.md and results.json
	$(PY) scripts/bench.py $(ARGS)

eval: $(STAMP) ## Test CKPT=<checkpoint> on its run's data, rebuilt from the run's config.yaml (ARGS="--split val")
	@test -n "$(CKPT)" || { echo "give CKPT=<path to a .ckpt file of a run>"; exit 2; }
	$(PY) scripts/evaluate.py $(CKPT) $(ARGS)

predict: $(STAMP) ## Predict with CKPT=<checkpoint> on INPUT=<image, folder, text or JSON file>; writes predictions.csv
	@test -n "$(CKPT)" -a -n "$(INPUT)" || { echo "give CKPT=<path to a .ckpt file> and INPUT=<file or folder>"; exit 2; }
	$(PY) scripts/predict.py $(CKPT) $(INPUT) $(ARGS)

export: $(STAMP) ## Export CKPT=<checkpoint>: safetensors + config.json; ONNX and TorchScript for image models; QUANTIZE=int8
	@test -n "$(CKPT)" || { echo "give CKPT=<path to a .ckpt file of a run>"; exit 2; }
	$(PY) scripts/export.py $(CKPT) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(ARGS)

sync: $(STAMP) ## Upload the W&B runs recorded offline (runs/wandb/offline-run-*) once an API key is configured
	@ls -d runs/wandb/offline-run-* >/dev/null 2>&1 || { echo "no offline W&B runs under runs/wandb"; exit 0; }
	$(VENV)/bin/wandb sync --include-offline runs/wandb/offline-run-*
