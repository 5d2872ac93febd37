{{/* Release-qualified name, 63 characters at most. */}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The chart's name, as nameOverride may change it. */}}
{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of one service's objects: <fullname>-<service>. */}}
{{- define "tessera.componentName" -}}
{{- printf "%s-%s" (include "tessera.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* commonAnnotations, as a metadata block (nothing when empty). */}}
{{- define "tessera.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* The global defaults with one service's overrides applied. */}}
{{- define "tessera.settings" -}}
{{- $overrides := omit .svc "enabled" "service" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.global) $overrides) -}}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* gRPC health service name of a gRPC service; empty for the gateway. */}}
{{- define "tessera.grpcName" -}}
{{- $names := dict "catalog" "tessera.catalog.v1.CatalogService" "eligibility" "tessera.eligibility.v1.EligibilityService" "wallet" "tessera.wallet.v1.WalletService" "campaign-scheduler" "tessera.scheduler.v1.SchedulerService" "notification" "tessera.notification.v1.NotificationService" -}}
{{- get $names . -}}
{{- end -}}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by every container: secrets and peers. */}}
{{- define "tessera.secretEnv" -}}
- name: TESSERA_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
- name: TESSERA_CACHE__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.cache.existingSecret }}
      key: {{ .Values.cache.urlKey }}
- name: TESSERA_INTERNAL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tessera.internalSecretName" . }}
      key: {{ .Values.internalSecret.key }}
- name: TESSERA_SECRETS__MASTER_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tessera.internalSecretName" . }}
      key: {{ .Values.internalSecret.masterKeyKey }}
- name: TESSERA_SECRETS__RETIRED_MASTER_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "tessera.internalSecretName" . }}
      key: {{ .Values.internalSecret.retiredMasterKeysKey }}
      optional: true
{{- end -}}

{{/* The Secret holding the suite's shared secret: the operator's, or the chart's own. */}}
{{- define "tessera.internalSecretName" -}}
{{- .Values.internalSecret.existingSecret | default (printf "%s-internal" (include "tessera.fullname" .)) -}}
{{- end -}}

{{/* Restricted pod security (Pod Security Standards "restricted"). */}}
{{- define "tessera.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tessera.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Egress every Tessera pod needs: DNS, the other services, and the configured backends. */}}
{{- define "tessera.egress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
- to:
    - podSelector:
        matchLabels:
          app.kubernetes.io/instance: {{ .Release.Name }}
  ports:
    - {port: 50051, protocol: TCP}
# A service running alone asks the gateway who an API key is.
- to:
    - podSelector:
        matchLabels:
          app.kubernetes.io/instance: {{ .Release.Name }}
          app.kubernetes.io/component: gateway
  ports:
    - {port: 8080, protocol: TCP}
{{- with .Values.networkPolicy.externalEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}
