# One image for both components: `nodemesh controller run` and `nodemesh agent run`.
# The agent compiles its BPF programs with bcc at start against the node's kernel headers, which
# the DaemonSet mounts from the host (/lib/modules, /usr/src), as bcc-based tools do.
FROM debian:bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv --system-site-packages /opt/nodemesh \
    && /opt/nodemesh/bin/pip install --no-cache-dir .

FROM debian:bookworm-slim
# python3-bpfcc is Debian-only (not on PyPI): the venv sees it through system site packages.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-bpfcc iproute2 nftables ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/nodemesh /opt/nodemesh
ENV PATH=/opt/nodemesh/bin:$PATH PYTHONUNBUFFERED=1
# The controller runs as this user (runAsNonRoot); the agent DaemonSet overrides it with privileged.
USER 65532:65532
ENTRYPOINT ["nodemesh"]
