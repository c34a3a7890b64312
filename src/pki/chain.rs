//! The certificates above an issued one, as every answer carries them (a leaf module: `ca`
//! holds a CA's chain, `types` answers with it).

use serde::Serialize;

/// The PEM certificates above an issued one, nearest first (the issuing CA's, then those above
/// it). The same for every certificate of a CA, so it is written as JSON once, when the CA is
/// loaded, and shared by every answer: escaping the same PEM text into each answer and copying
/// it was ~1.5% of an issuance's instructions (docs/PERFORMANCE.md).
#[derive(Clone)]
pub struct Chain(std::sync::Arc<EncodedChain>);

struct EncodedChain {
    pems: Vec<String>,
    /// `pems` as JSON (a list of strings always encodes; were it not to, each answer would
    /// encode the list itself).
    json: Option<Box<serde_json::value::RawValue>>,
}

impl Chain {
    pub fn new(pems: Vec<String>) -> Chain {
        let json = serde_json::value::to_raw_value(&pems).ok();
        Chain(std::sync::Arc::new(EncodedChain { pems, json }))
    }
}

impl Default for Chain {
    fn default() -> Chain {
        Chain::new(Vec::new())
    }
}

impl std::ops::Deref for Chain {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0.pems
    }
}

impl PartialEq for Chain {
    fn eq(&self, other: &Chain) -> bool {
        self.0.pems == other.0.pems
    }
}

impl Eq for Chain {}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.0.pems).finish()
    }
}

impl Serialize for Chain {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0.json {
            Some(json) => json.serialize(serializer),
            None => self.0.pems.serialize(serializer),
        }
    }
}
