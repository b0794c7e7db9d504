//! Where a call goes: model mapping and the key pools of each level.

pub mod catalog;
pub mod mapping;
pub mod pools;

pub use mapping::ModelMapper;
pub use pools::KeyPools;
