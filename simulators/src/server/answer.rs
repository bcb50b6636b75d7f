//! How one simulated meter answers one request: the pure core shared by
//! the Modbus TCP and the RTU servers, which only move bytes.
//!
//! In this order:
//! 1. a `meter_silent` fault: no reply;
//! 2. a `modbus_exception` fault: that exception code, whatever was asked;
//! 3. a function other than the read its profile uses (FC03 for DTSU666,
//!    FC04 for SDM630): illegal function (01);
//! 4. a quantity outside 1..=125: illegal data value (03);
//! 5. any register outside the meter's documented blocks: illegal data
//!    address (02);
//! 6. otherwise the words [`Profile::encode`] gives for the plant's values
//!    at the virtual time of the request; registers of a block that no
//!    field of the profile covers read 0.
//!
//! `slow_reply`/`late_reply` faults delay whatever the answer is;
//! `bad_crc` marks it for a corrupted CRC (the transports decide what that
//! means). Invariant: the answer is decided when the request arrives, so a
//! late reply carries the values of the moment it was asked for.
//!
//! A meter's documented blocks are the vendor's contiguous register blocks
//! of built-in models (e.g. DTSU666 `0x2000..0x2046`, where also the line
//! voltages and the frequency live), plus the profile's fields coalesced
//! as generously as one read allows, so every field, and every gap a
//! gateway may read across, is inside a block.

use std::collections::BTreeMap;
use std::time::Duration;

use facwatch_proto::profile::{
    FunctionCode, Profile, ProfileName, Ratios, ReadLimits, MAX_REGISTERS_PER_READ,
};
use facwatch_proto::site::Meter;

use crate::plant::Plant;
use crate::scenario::Scenario;

/// Modbus exception codes the meters use.
pub(crate) const ILLEGAL_FUNCTION: u8 = 1;
pub(crate) const ILLEGAL_DATA_ADDRESS: u8 = 2;
pub(crate) const ILLEGAL_DATA_VALUE: u8 = 3;
pub(crate) const SERVER_DEVICE_FAILURE: u8 = 4;

/// A request as a meter sees it, whatever the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// FC03 or FC04.
    Read {
        function: FunctionCode,
        address: u16,
        count: u16,
    },
    /// Any other function code.
    Other { function: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Nothing is sent.
    Silence,
    Words {
        function: FunctionCode,
        words: Vec<u16>,
    },
    Exception(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    /// Wall-clock wait before sending the reply.
    pub(crate) delay: Duration,
    /// Send the RTU frame with a corrupted CRC; on Modbus TCP send nothing.
    pub(crate) corrupt_crc: bool,
}

/// A contiguous range of registers `[start, end)` a meter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    function: FunctionCode,
    start: u32,
    end: u32,
}

/// One meter as a server: its profile and where it answers.
#[derive(Debug, Clone)]
pub(crate) struct ServedMeter {
    pub(crate) id: String,
    profile: Profile,
    ratios: Ratios,
    blocks: Vec<Block>,
}

impl ServedMeter {
    pub(crate) fn new(meter: &Meter) -> ServedMeter {
        // The widest coalescing one read allows.
        let generous = ReadLimits {
            max_registers: MAX_REGISTERS_PER_READ,
            max_gap: MAX_REGISTERS_PER_READ,
        };
        let mut blocks: Vec<Block> = meter
            .profile
            .reads(generous)
            .into_iter()
            .map(|read| Block {
                function: read.function,
                start: u32::from(read.address),
                end: u32::from(read.address) + u32::from(read.count),
            })
            .collect();
        if let Ok(name) = meter.profile.name.parse::<ProfileName>() {
            blocks.extend(vendor_blocks(name));
        }
        ServedMeter {
            id: meter.id.clone(),
            profile: meter.profile.clone(),
            ratios: meter.ratios,
            blocks,
        }
    }

    fn answers(&self, function: FunctionCode, register: u32) -> bool {
        self.blocks
            .iter()
            .any(|b| b.function == function && (b.start..b.end).contains(&register))
    }

    /// The reply of a healthy meter.
    fn reply(&self, plant: &Plant, request: Request, at_ms: i64) -> Reply {
        let Request::Read {
            function,
            address,
            count,
        } = request
        else {
            return Reply::Exception(ILLEGAL_FUNCTION);
        };
        if !self.profile.fields.iter().any(|f| f.function == function) {
            return Reply::Exception(ILLEGAL_FUNCTION);
        }
        if count == 0 || count > MAX_REGISTERS_PER_READ {
            return Reply::Exception(ILLEGAL_DATA_VALUE);
        }
        let requested = u32::from(address)..u32::from(address) + u32::from(count);
        if !requested.clone().all(|r| self.answers(function, r)) {
            return Reply::Exception(ILLEGAL_DATA_ADDRESS);
        }
        let Some(values) = plant.values(&self.id, at_ms) else {
            // Not reachable for meters of the scenario's site; a real meter
            // with a broken measuring board says this.
            return Reply::Exception(SERVER_DEVICE_FAILURE);
        };
        let image: BTreeMap<u32, u16> = self
            .profile
            .encode(&values, self.ratios)
            .into_iter()
            .filter(|(f, _, _)| *f == function)
            .map(|(_, address, word)| (u32::from(address), word))
            .collect();
        let words = requested
            .map(|register| image.get(&register).copied().unwrap_or(0))
            .collect();
        Reply::Words { function, words }
    }
}

/// The contiguous blocks the vendors document beyond the fields facwatch
/// reads, where a read across unmodelled registers must still succeed.
fn vendor_blocks(name: ProfileName) -> Vec<Block> {
    let block = |function, start: u32, end: u32| Block {
        function,
        start,
        end,
    };
    match name {
        // Uab 0x2000 .. Freq 0x2044; ImpEp 0x401E .. ExpEp 0x4028.
        ProfileName::Dtsu666 => vec![
            block(FunctionCode::ReadHoldingRegisters, 0x2000, 0x2046),
            block(FunctionCode::ReadHoldingRegisters, 0x401E, 0x402A),
        ],
        // U 0x2000 .. F 0x200E; import kWh 0x4000.
        ProfileName::Ddsu666 => vec![
            block(FunctionCode::ReadInputRegisters, 0x2000, 0x2010),
            block(FunctionCode::ReadInputRegisters, 0x4000, 0x4002),
        ],
        // Phase voltages 0x00 .. import kWh 0x48 (Hz 0x46 inside).
        ProfileName::Sdm630 | ProfileName::Sdm120 => {
            vec![block(FunctionCode::ReadInputRegisters, 0x00, 0x4A)]
        }
        ProfileName::Adl400 | ProfileName::Adw300 => Vec::new(),
    }
}

/// The answer of `meter` to `request` at virtual time `at_ms`, faults
/// included.
pub(crate) fn answer(
    meter: &ServedMeter,
    plant: &Plant,
    scenario: &Scenario,
    request: Request,
    at_ms: i64,
) -> Answer {
    let faults = scenario.meter_faults(&meter.id, at_ms);
    if faults.silent {
        return Answer {
            reply: Reply::Silence,
            delay: Duration::ZERO,
            corrupt_crc: false,
        };
    }
    let reply = match faults.exception {
        Some(code) => Reply::Exception(code),
        None => meter.reply(plant, request, at_ms),
    };
    Answer {
        reply,
        delay: faults.delay,
        corrupt_crc: faults.bad_crc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::{demo_ms, deploy_scenario};

    fn served(scenario: &Scenario, id: &str) -> ServedMeter {
        ServedMeter::new(scenario.site.meter(id).unwrap())
    }

    fn read(function: FunctionCode, address: u16, count: u16) -> Request {
        Request::Read {
            function,
            address,
            count,
        }
    }

    const FC3: FunctionCode = FunctionCode::ReadHoldingRegisters;
    const FC4: FunctionCode = FunctionCode::ReadInputRegisters;

    #[test]
    fn requests_get_the_answers_a_real_meter_gives() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        let at = demo_ms("10:00:00");
        let stenter = served(&scenario, "l1-stenter");
        assert_eq!(stenter.profile.name, ProfileName::Dtsu666.as_str());
        let ask =
            |meter: &ServedMeter, request| answer(meter, &plant, &scenario, request, at).reply;
        let exception = Reply::Exception;
        assert_eq!(
            ask(&stenter, read(FC4, 0x2000, 2)),
            exception(ILLEGAL_FUNCTION)
        );
        assert_eq!(
            ask(&stenter, Request::Other { function: 1 }),
            exception(ILLEGAL_FUNCTION)
        );
        assert_eq!(
            ask(&stenter, read(FC3, 0x2000, 0)),
            exception(ILLEGAL_DATA_VALUE)
        );
        assert_eq!(
            ask(&stenter, read(FC3, 0x2000, 126)),
            exception(ILLEGAL_DATA_VALUE)
        );
        // The block 0x2000..0x2046 is mapped; one register past it is not.
        assert!(matches!(
            ask(&stenter, read(FC3, 0x2000, 0x46)),
            Reply::Words { words, .. } if words.len() == 0x46
        ));
        assert_eq!(
            ask(&stenter, read(FC3, 0x2000, 0x47)),
            exception(ILLEGAL_DATA_ADDRESS)
        );
        assert_eq!(
            ask(&stenter, read(FC3, 0x1FFF, 2)),
            exception(ILLEGAL_DATA_ADDRESS)
        );
        assert_eq!(
            ask(&stenter, read(FC3, 0xFFFF, 2)),
            exception(ILLEGAL_DATA_ADDRESS)
        );
        // Pt alone, as in DOMAIN.md's example frame `01 03 20 12 00 02`.
        let Reply::Words { function, words } = ask(&stenter, read(FC3, 0x2012, 2)) else {
            panic!("no words");
        };
        assert_eq!(function, FC3);
        let raw = f32::from_bits((u32::from(words[0]) << 16) | u32::from(words[1]));
        let expected = plant.values("l1-stenter", at).unwrap().power_kw.unwrap();
        // Secondary side: P = raw * PT * CT * 0.1 W.
        assert!((f64::from(raw) * 40.0 * 0.1 / 1000.0 - f64::from(expected)).abs() < 1e-3);
        // Pa..Pc (0x2014..0x2019) are in the block but not modelled: zero.
        let Reply::Words { words, .. } = ask(&stenter, read(FC3, 0x2014, 6)) else {
            panic!("no words");
        };
        assert_eq!(words, [0; 6]);

        let pump = served(&scenario, "l1-spray-pump");
        assert_eq!(ask(&pump, read(FC3, 0, 2)), exception(ILLEGAL_FUNCTION));
        assert!(matches!(
            ask(&pump, read(FC4, 0, 0x4A)),
            Reply::Words { words, .. } if words.len() == 0x4A
        ));
        assert_eq!(
            ask(&pump, read(FC4, 0x48, 4)),
            exception(ILLEGAL_DATA_ADDRESS)
        );
    }

    #[test]
    fn every_builtin_profile_answers_its_fields_and_refuses_outside_its_blocks() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        let at = demo_ms("10:00:00");
        let template = scenario.site.meter("l1-stenter").unwrap();
        for name in ProfileName::ALL {
            let mut meter = template.clone();
            meter.profile = Profile::builtin(name);
            let served = ServedMeter::new(&meter);
            let function = meter.profile.fields[0].function;
            let other = match function {
                FC3 => FC4,
                FC4 => FC3,
            };
            let ask = |request| answer(&served, &plant, &scenario, request, at).reply;
            let mut results = Vec::new();
            for read in meter.profile.reads(meter.read_limits) {
                let Reply::Words { words, .. } = ask(Request::Read {
                    function: read.function,
                    address: read.address,
                    count: read.count,
                }) else {
                    panic!("{name:?}: {read:?} was refused");
                };
                results.push(facwatch_proto::profile::ReadResult {
                    function: read.function,
                    address: read.address,
                    words,
                });
            }
            let values = meter.profile.decode(&results, meter.ratios).unwrap();
            let expected = plant.values("l1-stenter", at).unwrap();
            let got = f64::from(values.power_kw.unwrap());
            let want = f64::from(expected.power_kw.unwrap());
            // Integer profiles resolve 1 W times the CT ratio of 40.
            assert!(
                (got - want).abs() <= 0.05,
                "{name:?}: {got} kW, want {want}"
            );
            assert_eq!(
                ask(read(other, meter.profile.fields[0].address, 1)),
                Reply::Exception(ILLEGAL_FUNCTION),
                "{name:?}"
            );
            assert_eq!(
                ask(read(function, 0x9000, 2)),
                Reply::Exception(ILLEGAL_DATA_ADDRESS),
                "{name:?}"
            );
        }
    }

    #[test]
    fn scenario_faults_override_the_answer() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        let fan = served(&scenario, "l2-main-fan");
        let request = read(FC3, 0x2006, 0x26);
        assert_eq!(
            answer(&fan, &plant, &scenario, request, demo_ms("16:10:00")),
            Answer {
                reply: Reply::Silence,
                delay: Duration::ZERO,
                corrupt_crc: false
            }
        );
        let pump = served(&scenario, "l2-spray-pump");
        // Even a request it would refuse otherwise gets the fault's code.
        let wrong = read(FC3, 0, 2);
        assert_eq!(
            answer(&pump, &plant, &scenario, wrong, demo_ms("18:01:00")).reply,
            Reply::Exception(SERVER_DEVICE_FAILURE)
        );
        assert_eq!(
            answer(&pump, &plant, &scenario, wrong, demo_ms("18:05:00")).reply,
            Reply::Exception(ILLEGAL_FUNCTION)
        );
    }
}
