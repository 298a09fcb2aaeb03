//! Writing metric families through `prometheus_client`'s collector interface: one descriptor,
//! then a sample per label set.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Writes one family: its descriptor, then one sample per label set.
pub fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let unit = unit.as_ref();
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a family of one unlabelled sample.
pub fn one<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> fmt::Result {
    let unit = unit.as_ref();
    metric.encode(enc.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// Writes a counter family, one sample per label set.
pub fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, unit, MetricType::Counter, samples)
}

/// Writes a gauge family, one sample per label set.
pub fn gauge<L: EncodeLabelSet, N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (L, N)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, unit, MetricType::Gauge, samples)
}
