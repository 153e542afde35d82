#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPart {
    Field(String),
    Index(usize),
}
