{{/* Names are cut to 63 characters: the DNS label limit for Kubernetes names. */}}
{{- define "kvgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The server's pods only: the migration Job's pods must never receive traffic or count for the PDB. */}}
{{- define "kvgate.serverSelectorLabels" -}}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ include "kvgate.chart" . }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the ledger lives in an external database (PostgreSQL), else "". */}}
{{- define "kvgate.externalDatabase" -}}
{{- if or .Values.database.url (and .Values.existingSecret.name .Values.existingSecret.databaseUrlKey) }}true{{ end }}
{{- end }}

{{- define "kvgate.secretName" -}}
{{- default (include "kvgate.fullname" .) .Values.existingSecret.name }}
{{- end }}

{{- define "kvgate.adminKeyKey" -}}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.adminKeyKey }}{{ else }}admin-key{{ end }}
{{- end }}

{{/* The Secret key holding the metrics key; "" when there is none (existingSecret without metricsKeyKey). */}}
{{- define "kvgate.metricsKeyKey" -}}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.metricsKeyKey }}{{ else }}metrics-key{{ end }}
{{- end }}

{{- define "kvgate.databaseUrlKey" -}}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.databaseUrlKey }}{{ else }}database-url{{ end }}
{{- end }}

{{- define "kvgate.sqliteUrl" -}}
{{- printf "sqlite:///%s/kvgate.db" (.Values.database.sqlite.mountPath | trimSuffix "/") }}
{{- end }}

{{- define "kvgate.sqliteClaim" -}}
{{- default (printf "%s-data" (include "kvgate.fullname" .)) .Values.database.sqlite.persistence.existingClaim }}
{{- end }}

{{- define "kvgate.modelPath" -}}
{{- if has .Values.model.source (list "demo" "smollm2") }}{{ .Values.model.source }}
{{- else if .Values.model.subPath }}{{ printf "%s/%s" (.Values.model.mountPath | trimSuffix "/") (.Values.model.subPath | trimPrefix "/") }}
{{- else }}{{ .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Byte sizes: YAML numbers arrive as floats, so print them as integers, not 2.68435456e+08. */}}
{{- define "kvgate.scalar" -}}
{{- if kindIs "string" . }}{{ . }}
{{- else if kindIs "bool" . }}{{ ternary "1" "0" . }}
{{- else if kindIs "float64" . }}{{ . | int64 }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/*
Environment of every container that runs kvgate (server, init migration).
The database URL comes from the Secret when it is external; SQLite's is in the ConfigMap.
*/}}
{{- define "kvgate.secretEnv" -}}
- name: KVGATE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "kvgate.secretName" . }}
      key: {{ include "kvgate.adminKeyKey" . }}
{{- if include "kvgate.externalDatabase" . }}
- name: KVGATE_DB
  valueFrom:
    secretKeyRef:
      name: {{ include "kvgate.secretName" . }}
      key: {{ include "kvgate.databaseUrlKey" . }}
{{- end }}
{{- end }}

{{/* Paths that must be writable under a read-only root filesystem all point into the cache dir. */}}
{{- define "kvgate.cacheEnv" -}}
- name: HOME
  value: {{ .Values.cache.mountPath | quote }}
- name: XDG_CACHE_HOME
  value: {{ .Values.cache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/triton" .Values.cache.mountPath | quote }}
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ printf "%s/torchinductor" .Values.cache.mountPath | quote }}
- name: TMPDIR
  value: /tmp
{{- if .Values.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}
{{- end }}

{{/* Checks that need more than one value at a time; values.schema.json does the rest. */}}
{{- define "kvgate.validate" -}}
{{- $external := include "kvgate.externalDatabase" . }}
{{- if and (not $external) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "\n\nkvgate: replicaCount=%d needs a shared database, but none is set. Without database.url the ledger is SQLite: one file on one ReadWriteOnce volume that a single pod can open, so several replicas would bill into separate, diverging ledgers. Set database.url to a PostgreSQL URL (postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB), or existingSecret.name with existingSecret.databaseUrlKey, or set replicaCount=1." (int .Values.replicaCount)) }}
{{- end }}
{{- if and (not $external) .Values.autoscaling.enabled }}
{{- fail "\n\nkvgate: autoscaling.enabled scales past one replica, which needs a shared database, but none is set. Without database.url the ledger is SQLite on a ReadWriteOnce volume that a single pod can open. Set database.url (PostgreSQL) or existingSecret.databaseUrlKey, or disable autoscaling." }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.containerPort) }}
{{- fail (printf "\n\nkvgate: metrics.port=%d is the API port (containerPort): /metrics needs a port of its own, which the API port never serves. Pick another metrics.port." (int .Values.metrics.port)) }}
{{- end }}
{{- if and .Values.existingSecret.name .Values.database.url }}
{{- fail "\n\nkvgate: database.url is set together with existingSecret.name; the chart creates no Secret then, so the URL would be ignored. Put the URL in your Secret and name its key in existingSecret.databaseUrlKey, or unset existingSecret.name." }}
{{- end }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 15 | int) }}
{{- fail (printf "\n\nkvgate: terminationGracePeriodSeconds=%d leaves no time to drain: it must exceed preStopSleepSeconds (%d) by at least 15 s (drain, then 10 s to close the engine and the ledger)." (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "\n\nkvgate: model.source=pvc needs model.pvc.claimName, the PersistentVolumeClaim that holds the model directory." }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "\n\nkvgate: model.source=hostPath needs model.hostPath.path, the model directory on the node." }}
{{- end }}
{{- include "kvgate.validateScaleOut" . }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.metrics) }}
{{- fail "\n\nkvgate: autoscaling.enabled needs a metric: set autoscaling.targetCPUUtilizationPercentage or autoscaling.metrics." }}
{{- end }}
{{- end }}
