{{/* Scale-out: routers, the engines' headless Service, Valkey (shared tier and cache events). */}}

{{- define "kvgate.routerSelectorLabels" -}}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "kvgate.valkeySelectorLabels" -}}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/component: valkey
{{- end }}

{{- define "kvgate.routerName" -}}
{{- printf "%s-router" (include "kvgate.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "kvgate.enginesName" -}}
{{- printf "%s-engines" (include "kvgate.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "kvgate.valkeyName" -}}
{{- printf "%s-valkey" (include "kvgate.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/* "true" when a Valkey is configured (external URL, existing Secret key, or the chart's own). */}}
{{- define "kvgate.valkey" -}}
{{- if or .Values.valkey.url .Values.valkey.deploy (and .Values.existingSecret.name .Values.existingSecret.valkeyUrlKey) }}true{{ end }}
{{- end }}

{{/* One env entry: variable NAME (given as .name) holding the Valkey URL. */}}
{{- define "kvgate.valkeyUrlEnv" -}}
{{- $ := .root }}
- name: {{ .name }}
{{- if $.Values.valkey.deploy }}
  value: {{ printf "redis://%s.%s.svc:%d/0" (include "kvgate.valkeyName" $) $.Release.Namespace (int $.Values.valkey.port) | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ include "kvgate.secretName" $ }}
      key: {{ if $.Values.existingSecret.name }}{{ $.Values.existingSecret.valkeyUrlKey }}{{ else }}valkey-url{{ end }}
{{- end }}
{{- end }}

{{/* The Secret key holding the cache events' HMAC key; empty when no events flow (no router or no Valkey). */}}
{{- define "kvgate.eventsSecretKey" -}}
{{- if and .Values.router.enabled (include "kvgate.valkey" .) }}
{{- if .Values.existingSecret.name }}{{ .Values.existingSecret.eventsSecretKey | default .Values.existingSecret.sharedTierSecretKey }}
{{- else }}events-secret{{ end }}
{{- end }}
{{- end }}

{{/* KVGATE_EVENTS_SECRET, for engines and routers alike. */}}
{{- define "kvgate.eventsSecretEnv" -}}
{{- $key := include "kvgate.eventsSecretKey" . }}
{{- if $key }}
- name: KVGATE_EVENTS_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "kvgate.secretName" . }}
      key: {{ $key }}
{{- end }}
{{- end }}

{{/* The engine container's scale-out environment. */}}
{{- define "kvgate.scaleOutEnv" -}}
{{- if .Values.router.enabled }}
# The id routers know this replica by: its pod address (downward API).
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: KVGATE_REPLICA_ID
  value: {{ printf "http://$(POD_IP):%d" (int .Values.containerPort) | quote }}
{{- if include "kvgate.valkey" . }}
{{ include "kvgate.valkeyUrlEnv" (dict "root" . "name" "KVGATE_EVENTS_URL") }}
{{ include "kvgate.eventsSecretEnv" . }}
{{- end }}
{{- end }}
{{- if .Values.sharedTier.enabled }}
{{ include "kvgate.valkeyUrlEnv" (dict "root" . "name" "KVGATE_SHARED_TIER_URL") }}
{{- $secretKey := "" }}
{{- if .Values.existingSecret.name }}{{ $secretKey = .Values.existingSecret.sharedTierSecretKey }}
{{- else if .Values.sharedTier.secret }}{{ $secretKey = "shared-tier-secret" }}{{ end }}
{{- if $secretKey }}
- name: KVGATE_SHARED_TIER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "kvgate.secretName" . }}
      key: {{ $secretKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Values that contradict each other in a scaled-out release. */}}
{{- define "kvgate.validateScaleOut" -}}
{{- $external := include "kvgate.externalDatabase" . }}
{{- if and .Values.router.enabled (not $external) }}
{{- fail "\n\nkvgate: router.enabled needs a shared database, but none is set: routers check API keys against the engines' ledger, and SQLite is one file one pod can open. Set database.url to a PostgreSQL URL (postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB) or existingSecret.databaseUrlKey." }}
{{- end }}
{{- if and .Values.keda.enabled (not $external) }}
{{- fail "\n\nkvgate: keda.enabled scales past one replica, which needs a shared database, but none is set (SQLite is one file one pod can open). Set database.url (PostgreSQL) or existingSecret.databaseUrlKey, or disable keda." }}
{{- end }}
{{- if and .Values.keda.enabled .Values.autoscaling.enabled }}
{{- fail "\n\nkvgate: keda.enabled and autoscaling.enabled both scale the engine Deployment (KEDA creates its own HPA). Keep one." }}
{{- end }}
{{- if and .Values.sharedTier.enabled (not (include "kvgate.valkey" .)) }}
{{- fail "\n\nkvgate: sharedTier.enabled needs a Valkey: set valkey.url (redis://HOST:PORT/DB), existingSecret.valkeyUrlKey, or valkey.deploy=true." }}
{{- end }}
{{- if and .Values.valkey.url .Values.valkey.deploy }}
{{- fail "\n\nkvgate: valkey.url and valkey.deploy are both set: use the external server (url) or the chart's own (deploy), not both." }}
{{- end }}
{{- if and .Values.existingSecret.name .Values.valkey.url }}
{{- fail "\n\nkvgate: valkey.url is set together with existingSecret.name; the chart creates no Secret then, so the URL would be ignored. Put it in your Secret and name its key in existingSecret.valkeyUrlKey." }}
{{- end }}
{{- if and .Values.existingSecret.name .Values.router.eventsSecret }}
{{- fail "\n\nkvgate: router.eventsSecret is set together with existingSecret.name; put it in your Secret and name its key in existingSecret.eventsSecretKey." }}
{{- end }}
{{- if and .Values.router.enabled (include "kvgate.valkey" .) .Values.existingSecret.name (not .Values.existingSecret.eventsSecretKey) (not .Values.existingSecret.sharedTierSecretKey) }}
{{- fail "\n\nkvgate: router.enabled with a Valkey sends cache events, which are signed: name the key of your Secret that holds their HMAC key in existingSecret.eventsSecretKey (or existingSecret.sharedTierSecretKey to use the shared tier's)." }}
{{- end }}
{{- if and .Values.existingSecret.name .Values.sharedTier.secret }}
{{- fail "\n\nkvgate: sharedTier.secret is set together with existingSecret.name; put it in your Secret and name its key in existingSecret.sharedTierSecretKey." }}
{{- end }}
{{- if and .Values.router.autoscaling.enabled (not .Values.router.autoscaling.targetCPUUtilizationPercentage) (not .Values.router.autoscaling.requestsPerSecond) }}
{{- fail "\n\nkvgate: router.autoscaling.enabled needs a metric: router.autoscaling.targetCPUUtilizationPercentage or router.autoscaling.requestsPerSecond." }}
{{- end }}
{{- end }}
