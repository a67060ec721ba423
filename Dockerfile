# ich on a GPU host (the NVIDIA driver and container toolkit on the host):
#   docker build -t ich .
#   docker run --gpus all --shm-size=8g -v /path/to/rsna:/data -v $PWD/outputs:/outputs ich \
#       experiment=rsna_strong data=rsna data.root=/data
# Runs land in /outputs/<date>/<time> and sweeps in /outputs/multirun/<date>/<time>; the phantom,
# the header index and the slice cache in /cache (a volume too, so they are built once).
#
# The base image already holds CUDA, cuDNN and the torch/torchvision pair that pyproject.toml pins; the
# constraints file built from it makes pip keep that pair (and fail loudly on a mismatch) rather than
# download a second torch. Moving to another torch means changing this tag and the pins together.
# The install is editable because the config groups (conf/) live beside the package, in /app.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    ICH_CACHE_DIR=/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ich ./ich
COPY conf ./conf
COPY train.py evaluate.py extract.py fit_classical.py predict.py ./
RUN pip freeze | grep -iE '^(torch|torchvision)==' > /tmp/base-torch.txt \
    && pip install --constraint /tmp/base-torch.txt --editable . \
    && python -c "import ich.train"

# The DICOM node (python -m ich.serve) listens on 11112; in a container it binds 0.0.0.0, which it accepts only
# with the PACS's AE title in serve.allowed_callers (docs/how-to/pacs.md):
#   docker run -p 11112:11112 -v /path/to/run:/model -v /srv/ich:/srv --entrypoint python ich -m ich.serve \
#       ckpt_path=/model serve.host=0.0.0.0 'serve.allowed_callers=[ORTHANC]' serve.spool=/srv/spool \
#       serve.results_dir=/srv/results 'serve.destinations=[{ae_title: ORTHANC, host: pacs.example, port: 4242}]'
EXPOSE 11112
VOLUME ["/data", "/outputs", "/cache"]
ENTRYPOINT ["python", "/app/train.py", "hydra.run.dir=/outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}", "hydra.sweep.dir=/outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"]
