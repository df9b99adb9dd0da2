# eep controller image: slim, non-root, no torch. Agents run where the devices are
# (install `eep[agent]` there, or `eep[agent,ascend]` on Ascend nodes).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY eep_controller ./eep_controller
COPY agents ./agents
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN groupadd --system eep && useradd --system --gid eep --home-dir /var/lib/eep --create-home eep
COPY --from=build /install /usr/local
USER eep
WORKDIR /var/lib/eep
ENV EEP_SERVER_HOST=0.0.0.0 \
    EEP_SERVER_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
# With no EEP_ETCD_ENDPOINTS the controller starts its embedded single-node etcd under
# /var/lib/eep: fine to try; production points EEP_ETCD_ENDPOINTS at an etcd cluster.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["eep-controller"]
CMD ["serve"]
