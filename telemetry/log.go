package telemetry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"go.opentelemetry.io/otel/trace"
)

// Log formats NewLogger accepts.
const (
	LogFormatJSON = "json"
	LogFormatText = "text"
)

// Errors NewLogger returns for settings it does not know.
var (
	ErrUnknownLogFormat = errors.New("unknown log format")
	ErrUnknownLogLevel  = errors.New("unknown log level")
)

// NewLogger returns a logger writing to w in format (LogFormatJSON when
// empty, or LogFormatText) from level up ("debug", "info" when empty,
// "warn", "error"). Lines logged with a context that holds a span
// (logger.InfoContext(ctx, …)) carry its trace_id and span_id, which is what
// joins a log line to its trace in Jaeger.
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	lvl, err := ParseLevel(level)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: lvl}

	var inner slog.Handler
	switch strings.ToLower(strings.TrimSpace(format)) {
	case "", LogFormatJSON:
		inner = slog.NewJSONHandler(w, opts)
	case LogFormatText:
		inner = slog.NewTextHandler(w, opts)
	default:
		return nil, fmt.Errorf("%w %q: use %s or %s", ErrUnknownLogFormat, format, LogFormatJSON, LogFormatText)
	}
	return slog.New(NewTraceHandler(inner)), nil
}

// ParseLevel reads a log level the way NewLogger does ("debug", "info" or
// empty, "warn" or "warning", "error", in any case), so that a config can
// refuse at load time exactly the levels NewLogger would refuse.
func ParseLevel(level string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(level)) {
	case "debug":
		return slog.LevelDebug, nil
	case "", "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%w %q: use debug, info, warn or error", ErrUnknownLogLevel, level)
}

// TraceHandler adds trace_id and span_id to records whose context holds a
// valid span, and otherwise passes records through unchanged. Inside a
// WithGroup the ids land in that group, as any record attribute would.
type TraceHandler struct {
	inner slog.Handler
}

// NewTraceHandler wraps inner so its records carry the active span's ids.
func NewTraceHandler(inner slog.Handler) *TraceHandler {
	return &TraceHandler{inner: inner}
}

// Enabled reports whether the wrapped handler takes records at level.
func (h *TraceHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.inner.Enabled(ctx, level)
}

// Handle adds the span's ids, when there is a span, and hands r on.
func (h *TraceHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		// Clone: the caller's record may share its attribute storage.
		r = r.Clone()
		r.AddAttrs(
			slog.String(LogTraceID, sc.TraceID().String()),
			slog.String(LogSpanID, sc.SpanID().String()),
		)
	}
	return h.inner.Handle(ctx, r)
}

// WithAttrs returns a TraceHandler around the wrapped handler with attrs.
func (h *TraceHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &TraceHandler{inner: h.inner.WithAttrs(attrs)}
}

// WithGroup returns a TraceHandler around the wrapped handler in group name.
func (h *TraceHandler) WithGroup(name string) slog.Handler {
	return &TraceHandler{inner: h.inner.WithGroup(name)}
}
