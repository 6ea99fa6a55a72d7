package telemetry

import (
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// Hard caps on what one span may hold. The OTEL_SPAN_*_LIMIT variables (and
// OTEL_ATTRIBUTE_*_LIMIT, OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT,
// OTEL_LINK_ATTRIBUTE_COUNT_LIMIT) may lower them, never lift them: with
// them, the largest span the agent can queue is bounded (about 1 MiB), which
// is what makes the export queue's byte budget meaningful.
//
// The agent's own spans hold about fifteen short attributes; the caps leave
// room for the instrumentation libraries' while stopping a runaway one.
const (
	// capAttributeValueLength bounds a string attribute value (and each
	// element of a list), in bytes; the span queue applies it to event
	// attributes, status descriptions and span names too, which the SDK
	// leaves unbounded.
	capAttributeValueLength = 1024
	// capAttributeDepth bounds the nesting of list and map attribute values.
	capAttributeDepth        = 4
	capAttributes            = 64
	capEvents                = 32
	capLinks                 = 16
	capAttributesPerEvent    = 16
	capAttributesPerLink     = 16
	capSpanNameLength        = 256
	capStatusDescriptionSize = capAttributeValueLength
)

// spanLimits returns the SDK's span limits as the environment sets them,
// each held to its cap. A negative setting (unlimited) becomes the cap.
func spanLimits() sdktrace.SpanLimits {
	env := sdktrace.NewSpanLimits()
	return sdktrace.SpanLimits{
		AttributeValueLengthLimit:   capped(env.AttributeValueLengthLimit, capAttributeValueLength),
		AttributeValueDepthLimit:    capAttributeDepth, // no variable sets it; 0 would mean the SDK's 64
		AttributeCountLimit:         capped(env.AttributeCountLimit, capAttributes),
		EventCountLimit:             capped(env.EventCountLimit, capEvents),
		LinkCountLimit:              capped(env.LinkCountLimit, capLinks),
		AttributePerEventCountLimit: capped(env.AttributePerEventCountLimit, capAttributesPerEvent),
		AttributePerLinkCountLimit:  capped(env.AttributePerLinkCountLimit, capAttributesPerLink),
	}
}

// capped holds v to at most limit; a negative v means unlimited to the SDK.
func capped(v, limit int) int {
	if v < 0 || v > limit {
		return limit
	}
	return v
}
