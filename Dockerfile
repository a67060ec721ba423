# ich on a GPU host: docker build -t ich . && docker run --gpus all -v $PWD/data:/data -v $PWD/outputs:/app/outputs ich data=rsna data.root=/data
# PyPI's torch wheels for Linux carry their CUDA runtime, so a slim Python base is enough;
# the host needs only the NVIDIA driver and the container toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    ICH_CACHE_DIR=/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ich ./ich
COPY conf ./conf
COPY train.py evaluate.py ./
RUN pip install -e .

VOLUME ["/data", "/app/outputs", "/cache"]
ENTRYPOINT ["python", "train.py"]
