{{/* Chart name, overridable. */}}
{{- define "orders-center.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; truncated to the 63 characters DNS allows. */}}
{{- define "orders-center.fullname" -}}
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

{{/* Name of one role's objects: <fullname>-<role>. */}}
{{- define "orders-center.component" -}}
{{- printf "%s-%s" (include "orders-center.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orders-center.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "orders-center.labels" -}}
helm.sh/chart: {{ include "orders-center.chart" . }}
{{ include "orders-center.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orders-center
{{- end }}

{{- define "orders-center.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orders-center.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one role: call with (dict "root" $ "component" "api"). */}}
{{- define "orders-center.componentLabels" -}}
{{ include "orders-center.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "orders-center.componentSelectorLabels" -}}
{{ include "orders-center.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The one image every role runs. */}}
{{- define "orders-center.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "orders-center.relayServiceAccount" -}}
{{- if .Values.relay.serviceAccount.create }}
{{- default (include "orders-center.component" (dict "root" . "component" "relay")) .Values.relay.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.relay.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "orders-center.leaseName" -}}
{{- default (include "orders-center.component" (dict "root" . "component" "relay")) .Values.relay.leaderElection.leaseName }}
{{- end }}

{{/* Secret holding DATABASE_URL, and its key. */}}
{{- define "orders-center.databaseSecret" -}}
{{- default (printf "%s-database" (include "orders-center.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/* Secret holding a saga service's database URL: (dict "root" $ "role" "inventory"). */}}
{{- define "orders-center.sagaDatabaseSecret" -}}
{{- $db := (index .root.Values.saga .role).database }}
{{- default (printf "%s-%s-database" (include "orders-center.fullname" .root) .role) $db.existingSecret }}
{{- end }}

{{/* Secret holding the 1C credentials (keys username and password). */}}
{{- define "orders-center.onecSecret" -}}
{{- default (printf "%s-onec" (include "orders-center.fullname" .)) .Values.onec.existingSecret }}
{{- end }}

{{/* Where the relay delivers: the given URL, else the in-chart mock. */}}
{{- define "orders-center.onecUrl" -}}
{{- if .Values.onec.url }}
{{- .Values.onec.url }}
{{- else if .Values.onecMock.enabled }}
{{- printf "http://%s:%d" (include "orders-center.component" (dict "root" . "component" "onec-mock")) (int .Values.onecMock.port) }}
{{- else }}
{{- fail "onec.url is required when onecMock.enabled is false" }}
{{- end }}
{{- end }}

{{/*
Environment shared by every orders-center container; called with
(dict "root" $ "role" "<role>"). A role named in broker.users reads the
broker as its own user.
*/}}
{{- define "orders-center.commonEnv" -}}
{{- $root := .root }}
{{- $user := get ($root.Values.broker.users | default dict) .role | default dict }}
{{- /* The migration hook runs before the release's Secrets exist: it reads the URLs the chart makes from its own hook Secret. */}}
{{- $hook := eq .role "migrate" }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ ternary (include "orders-center.migrateSecret" $root) (include "orders-center.databaseSecret" $root) (and $hook (not $root.Values.database.existingSecret)) }}
      key: {{ $root.Values.database.existingSecretKey }}
- name: LOG_FORMAT
  value: {{ $root.Values.logFormat | quote }}
{{- with $root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if include "orders-center.brokerEnabled" $root }}
# The API routes events to the broker; the relay publishes; consumers read.
- name: BROKER
  valueFrom:
    secretKeyRef:
      name: {{ $user.existingSecret | default (ternary (include "orders-center.migrateSecret" $root) (include "orders-center.brokerSecret" $root) (and $hook (not $root.Values.broker.existingSecret))) }}
      key: {{ $user.existingSecretKey | default $root.Values.broker.existingSecretKey }}
- name: BROKER_PREFIX
  value: {{ $root.Values.broker.prefix | quote }}
{{- end }}
{{- if $root.Values.saga.enabled }}
# Orders created with a checkout start a saga; its steps are due in this.
- name: SAGAS
  value: "true"
- name: SAGA_STEP_TIMEOUT
  value: {{ $root.Values.saga.stepTimeout | quote }}
{{- end }}
{{- end }}

{{/*
A number as the user wrote it. Helm reads YAML numbers as float64, and
`quote` or `toString` print 1048576 as 1.048576e+06, which no integer flag
takes: whole numbers print as integers, the rest as they are.
*/}}
{{- define "orders-center.number" -}}
{{- if and (kindIs "float64" .) (eq (float64 .) (floor .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* Secret holding one signing key per saga stream. */}}
{{- define "orders-center.sagaKeysSecret" -}}
{{- default (printf "%s-saga-keys" (include "orders-center.fullname" .)) .Values.saga.keys.existingSecret }}
{{- end }}

{{/*
SAGA_KEYS of a role: the keys of its own streams only, so no role can sign
another's messages. Called with (dict "root" $ "streams" (list ...)).
*/}}
{{/* The Secret key of a saga stream's key: `reserve@saga` is `reserve_for_saga` ('@' is not allowed there). */}}
{{- define "orders-center.sagaKeyName" -}}
{{- replace "@" "_for_" . }}
{{- end }}

{{/* The streams whose keys sign or check saga messages, a key per reader where a stream has two. */}}
{{- define "orders-center.sagaStreams" -}}
reserve.commands payment.commands reserve@saga reserve@payments payment saga@notifier saga@inventory
{{- end }}

{{- define "orders-center.sagaKeysEnv" -}}
{{- $secret := include "orders-center.sagaKeysSecret" .root }}
{{- $pairs := list }}
{{- range $i, $stream := .streams }}
- name: SAGA_KEY_{{ $i }}
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ include "orders-center.sagaKeyName" $stream }}}
{{- $pairs = append $pairs (printf "%s=$(SAGA_KEY_%d)" $stream $i) }}
{{- end }}
- name: SAGA_KEYS
  value: {{ join "," $pairs | quote }}
{{- end }}

{{/* Non-empty when a broker is configured. */}}
{{- define "orders-center.brokerEnabled" -}}
{{- if or .Values.broker.url .Values.broker.existingSecret }}true{{ end }}
{{- end }}

{{/* The relays' destinations, one per line: 1C, and the broker's (named
by the scheme of broker.url, or by broker.kind). */}}
{{- define "orders-center.relayDestinations" -}}
onec
{{- if include "orders-center.brokerEnabled" . }}
{{- $kind := .Values.broker.kind }}
{{- if not $kind }}
{{- if hasPrefix "amqp" .Values.broker.url }}{{ $kind = "rabbitmq" }}
{{- else if hasPrefix "kafka" .Values.broker.url }}{{ $kind = "kafka" }}
{{- else }}{{ fail "set broker.kind (kafka or rabbitmq): the broker URL is in a Secret, and the relays' OutboxRelay resources are named by it" }}
{{- end }}
{{- end }}
{{ $kind }}
{{- end }}
{{- end }}

{{/* Whether the relay talks to the Kubernetes API. */}}
{{- define "orders-center.relayUsesApi" -}}
{{- if or (eq .Values.relay.leaderElection.backend "kube") .Values.relay.outboxRelays.enabled }}true{{ end }}
{{- end }}

{{/* Secret holding the broker URL. */}}
{{- define "orders-center.migrateSecret" -}}
{{- printf "%s-migrate" (include "orders-center.fullname" .) }}
{{- end }}

{{- define "orders-center.brokerSecret" -}}
{{- default (printf "%s-broker" (include "orders-center.fullname" .)) .Values.broker.existingSecret }}
{{- end }}

{{- define "orders-center.apiSecret" -}}
{{- default (printf "%s-api" (include "orders-center.fullname" .)) .Values.api.auth.existingSecret }}
{{- end }}

{{- define "orders-center.apiSecretKey" -}}
{{- if .Values.api.auth.existingSecret }}{{ .Values.api.auth.existingSecretKey }}{{ else }}tokens{{ end }}
{{- end }}
