{{/* Names, labels and shared pieces of the omoi chart. */}}

{{- define "omoi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "omoi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "omoi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "omoi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omoi
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "ticket") */}}
{{- define "omoi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omoi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "omoi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "omoi.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "omoi.secretName" -}}
{{- default (printf "%s-secrets" (include "omoi.fullname" .)) .Values.existingSecret -}}
{{- end -}}

{{- define "omoi.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The address of a service inside the cluster: (dict "root" $ "component" "ticket" "port" 50051) */}}
{{- define "omoi.url" -}}
{{- $scheme := ternary "https" "http" .root.Values.tls.enabled -}}
{{- printf "%s://%s-%s.%s.svc:%v" $scheme (include "omoi.fullname" .root) .component .root.Release.Namespace .port -}}
{{- end -}}

{{/* Environment every service's container has: its database and NATS,
     then what it shares with executors. */}}
{{- define "omoi.env" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "omoi.secretName" . }}
      key: DATABASE_URL
- name: NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "omoi.secretName" . }}
      key: NATS_URL
{{ include "omoi.peerEnv" . }}
{{- end -}}

{{/* Environment executors share with the services: secrets, peers, TLS
     (no database: executors never use one). */}}
{{- define "omoi.peerEnv" -}}
- name: OMOI_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "omoi.secretName" . }}
      key: OMOI_AUTH_TOKEN
      optional: true
- name: OMOI_TICKET_URL
  value: {{ include "omoi.url" (dict "root" . "component" "ticket" "port" .Values.ticket.port) | quote }}
- name: OMOI_TASK_QUEUE_URL
  value: {{ include "omoi.url" (dict "root" . "component" "task-queue" "port" .Values.taskQueue.port) | quote }}
- name: OMOI_HEALTH_URL
  value: {{ include "omoi.url" (dict "root" . "component" "health" "port" .Values.health.port) | quote }}
{{- if .Values.metrics.enabled }}
- name: OMOI_METRICS_ADDR
  value: "0.0.0.0:{{ .Values.metrics.port }}"
{{- end }}
{{- if .Values.tls.enabled }}
- name: OMOI_TLS_CERT
  value: /etc/omoi/tls/tls.crt
- name: OMOI_TLS_KEY
  value: /etc/omoi/tls/tls.key
- name: OMOI_TLS_CA
  value: /etc/omoi/tls/ca.crt
{{- if .Values.tls.mutual }}
- name: OMOI_TLS_CLIENT_CA
  value: /etc/omoi/tls/ca.crt
{{- end }}
- name: OMOI_PROBE_ADDR
  value: "0.0.0.0:{{ .Values.tls.probePort }}"
{{- end }}
{{- end -}}

{{/* NATS in operator mode (nats.auth.credsSecret): one credentials file
     of the Secret (.file) per pod, mounted read-only, named by
     NATS_CREDS_FILE. */}}
{{- define "omoi.natsCredsEnv" -}}
- name: NATS_CREDS_FILE
  value: /etc/omoi/nats/{{ .file }}
{{- end -}}

{{- define "omoi.natsCredsMount" -}}
- name: nats-creds
  mountPath: /etc/omoi/nats
  readOnly: true
{{- end -}}

{{- define "omoi.natsCredsVolume" -}}
- name: nats-creds
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      - key: {{ .file }}
        path: {{ .file }}
{{- end -}}

{{/* The TLS Secret, mounted read-only where omoi.env points. */}}
{{- define "omoi.tlsMount" -}}
- name: tls
  mountPath: /etc/omoi/tls
  readOnly: true
{{- end -}}

{{- define "omoi.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
    defaultMode: 0440
{{- end -}}

{{/* The container ports: gRPC, and metrics when on. */}}
{{- define "omoi.ports" -}}
- name: grpc
  containerPort: {{ .port }}
  protocol: TCP
{{- if .root.Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: probe
  containerPort: {{ .root.Values.tls.probePort }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* gRPC probes on grpc.health.v1: readiness follows the dependencies,
     liveness and start-up only the process ("liveness" stays SERVING).
     With TLS on they use the plaintext probe port. */}}
{{- define "omoi.probes" -}}
{{- $port := ternary .root.Values.tls.probePort .port .root.Values.tls.enabled -}}
startupProbe:
  grpc:
    port: {{ $port }}
    service: liveness
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  grpc:
    port: {{ $port }}
    service: liveness
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* Checkov checks this chart cannot satisfy, and why. */}}
{{- define "omoi.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_43=Images go by tag; production values pin tags (or digests).
checkov.io/skip2: CKV_K8S_35=omoi binaries read all config, secrets included, from env.
{{- end -}}
