# The two commands of the README: `make run` (main job) and `make test` (test suite).
# Both create .venv/ and install everything into it when missing; later calls reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.castling_det-installed
SHAPES := datasets/shapes
RUN_DIR := output/shapes_mask_rcnn_castling_vit_ti

.PHONY: setup run test clean

setup: $(INSTALLED)

$(INSTALLED): requirements.txt setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --no-deps -e .
	touch $@

run: setup
	$(PY) tools/make_shapes_dataset.py --output $(SHAPES)
	$(PY) tools/train_net.py \
		--config-file configs/Shapes/mask_rcnn_castling_vit_ti_fpn_shapes.yaml \
		--register-coco shapes_train $(SHAPES)/annotations/train.json $(SHAPES)/train \
		--register-coco shapes_val $(SHAPES)/annotations/val.json $(SHAPES)/val \
		OUTPUT_DIR $(RUN_DIR)

# The suite in TEST_WORKERS processes of one thread each, test files dealt out whole (a file's
# fixtures are built once): many tests are process start-up and small tensors, which a second
# thread barely speeds up and a second process runs side by side.
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf output $(SHAPES)
