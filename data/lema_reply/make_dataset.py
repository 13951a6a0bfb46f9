"""Generate the LEMA reply-format dataset (train.jsonl and heldout.jsonl).

The dataset teaches a model to always answer in one strict, machine-checkable
block::

    [LEMA_REPLY]
    Answer: <short answer>
    Explanation: <one sentence>
    Confidence: High|Medium|Low
    [/LEMA_REPLY]

Facts are hand-written below as ``(question, answer, explanation[, confidence])``
tuples grouped by topic (confidence defaults to "High"); arithmetic answers are
computed so they are correct by construction.  A fixed number of questions per
topic is held back for ``heldout.jsonl`` so the held-out check covers every
topic.  The output is deterministic: re-running produces identical files.

Run:  python data/lema_reply/make_dataset.py
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

SYSTEM_PROMPT = "You are a precise assistant trained using LEMA."
HELDOUT_PER_TOPIC = 2
SEED = 20240611
OUT_DIR = Path(__file__).resolve().parent

GEOGRAPHY = [
    ("What is the capital of France?", "Paris", "Paris is the seat of the French government."),
    ("What is the capital of Japan?", "Tokyo", "Tokyo has been Japan's capital since 1868."),
    ("What is the capital of Australia?", "Canberra", "Canberra was built as a compromise between Sydney and Melbourne."),
    ("What is the capital of Canada?", "Ottawa", "Ottawa, in Ontario, is home to Canada's Parliament."),
    ("Which city is the capital of Brazil?", "Brasília", "Brasília replaced Rio de Janeiro as the capital in 1960."),
    ("What is the capital of Egypt?", "Cairo", "Cairo lies on the Nile and is Egypt's seat of government."),
    ("What is the capital of Kenya?", "Nairobi", "Nairobi is Kenya's capital and largest city."),
    ("Name the capital of Germany.", "Berlin", "Berlin became the capital of reunified Germany in 1990."),
    ("What is the capital of Italy?", "Rome", "Rome has been Italy's capital since 1871."),
    ("What is the capital of Spain?", "Madrid", "Madrid sits near the center of Spain and hosts its government."),
    ("What is Norway's capital?", "Oslo", "Oslo is home to Norway's parliament and royal palace."),
    ("What is the capital of Argentina?", "Buenos Aires", "Buenos Aires lies on the Río de la Plata."),
    ("What is the capital of South Korea?", "Seoul", "Seoul is South Korea's capital and largest city."),
    ("What is the capital of Mexico?", "Mexico City", "Mexico City stands on the site of the Aztec city Tenochtitlan."),
    ("What is the capital of India?", "New Delhi", "New Delhi houses India's national government."),
    ("What is the capital of Turkey?", "Ankara", "Ankara replaced Istanbul as the capital in 1923."),
    ("What is the capital of Portugal?", "Lisbon", "Lisbon lies on the estuary of the Tagus River."),
    ("Which city is the capital of Peru?", "Lima", "Lima was founded by Francisco Pizarro in 1535."),
    ("What is the capital of Poland?", "Warsaw", "Warsaw lies on the Vistula River."),
    ("What is the capital of Thailand?", "Bangkok", "Bangkok is Thailand's capital and largest city."),
    ("What is the capital of New Zealand?", "Wellington", "Wellington sits at the southern tip of the North Island."),
    ("What is the capital of Switzerland?", "Bern", "Bern is the Swiss federal city where the government sits."),
    ("What is the longest river in the world?", "The Nile", "The Nile is usually ranked longest, though some measurements favor the Amazon.", "Medium"),
    ("What is the tallest mountain above sea level?", "Mount Everest", "Everest rises about 8,849 meters above sea level."),
    ("What is the largest ocean?", "The Pacific Ocean", "The Pacific covers about a third of Earth's surface."),
    ("Which is the largest continent by area?", "Asia", "Asia covers about 30 percent of Earth's land area."),
    ("What is the largest hot desert?", "The Sahara", "The Sahara spans most of North Africa."),
    ("Which country has the largest population?", "India", "India overtook China as the most populous country around 2023.", "Medium"),
    ("What is the largest country by area?", "Russia", "Russia spans about 17 million square kilometers."),
    ("On which continent is Kenya?", "Africa", "Kenya lies in East Africa on the equator."),
    ("Which river flows through Paris?", "The Seine", "The Seine runs through the center of Paris."),
    ("Which river flows through London?", "The Thames", "The Thames flows through London to the North Sea."),
    ("How many continents are there?", "Seven", "By the most common convention, Earth has seven continents."),
    ("What is the smallest country in the world?", "Vatican City", "Vatican City covers about 0.44 square kilometers."),
    ("In which country are the pyramids of Giza?", "Egypt", "The Giza pyramids stand on the edge of Cairo."),
    ("What is the largest island in the world?", "Greenland", "Greenland is the largest island that is not a continent."),
    ("Which mountains divide Europe from Asia?", "The Ural Mountains", "The Urals are the conventional boundary between the two continents."),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean", "The Indian Ocean stretches from East Africa to Western Australia."),
]

SCIENCE = [
    ("What is the chemical symbol for gold?", "Au", "The symbol comes from the Latin word aurum."),
    ("What is the chemical symbol for sodium?", "Na", "Na comes from the Latin name natrium."),
    ("What is the chemical symbol for iron?", "Fe", "Fe comes from the Latin word ferrum."),
    ("What is the chemical symbol for potassium?", "K", "K comes from the Latin name kalium."),
    ("What is the chemical symbol for silver?", "Ag", "Ag comes from the Latin word argentum."),
    ("What is the chemical formula of water?", "H2O", "Each water molecule has two hydrogen atoms and one oxygen atom."),
    ("What is the chemical formula of table salt?", "NaCl", "Table salt is sodium chloride."),
    ("Which gas do plants absorb for photosynthesis?", "Carbon dioxide", "Plants turn carbon dioxide and water into sugar using light."),
    ("Which gas makes up most of Earth's atmosphere?", "Nitrogen", "Nitrogen makes up about 78 percent of the air."),
    ("What is the atomic number of carbon?", "6", "Carbon has six protons in its nucleus."),
    ("What is the atomic number of oxygen?", "8", "Oxygen has eight protons in its nucleus."),
    ("What is the lightest element?", "Hydrogen", "Hydrogen has a single proton and is the lightest element."),
    ("At what temperature does water boil at sea level?", "100 °C", "Pure water boils at 100 °C under standard atmospheric pressure."),
    ("At what Fahrenheit temperature does water freeze?", "32 °F", "Water freezes at 32 °F, which equals 0 °C."),
    ("What is the speed of light in a vacuum?", "About 300,000 km/s", "Light covers just under 300,000 kilometers every second."),
    ("What force keeps the planets in orbit around the Sun?", "Gravity", "The Sun's gravity bends the planets' paths into orbits."),
    ("What is the unit of electrical resistance?", "The ohm", "Resistance is measured in ohms, written with the symbol Ω."),
    ("What is the SI unit of force?", "The newton", "One newton accelerates one kilogram by one meter per second squared."),
    ("Which particle in an atom has a negative charge?", "The electron", "Electrons carry negative charge and surround the nucleus."),
    ("What is known as the powerhouse of the cell?", "The mitochondrion", "Mitochondria produce most of a cell's energy as ATP."),
    ("Which molecule carries genetic information?", "DNA", "DNA stores hereditary instructions in its sequence of bases."),
    ("How many chromosomes do humans usually have?", "46", "Most human cells have 23 pairs of chromosomes."),
    ("Which organ pumps blood through the human body?", "The heart", "The heart's contractions push blood through the blood vessels."),
    ("What is the largest organ of the human body?", "The skin", "The skin covers the whole body and is its largest organ."),
    ("How many bones are in the adult human body?", "206", "An adult skeleton typically has 206 bones."),
    ("What is the hardest natural substance?", "Diamond", "Diamond's tightly bonded carbon lattice makes it extremely hard."),
    ("What is the pH of pure water at 25 °C?", "7", "Pure water is neutral, with a pH of 7."),
    ("What kind of energy does a moving object have?", "Kinetic energy", "Kinetic energy is the energy of motion."),
    ("What is the main element in the Sun?", "Hydrogen", "The Sun is mostly hydrogen, which it fuses into helium."),
    ("Which vitamin does the skin make in sunlight?", "Vitamin D", "UVB light lets the skin produce vitamin D."),
    ("Which blood cells fight infection?", "White blood cells", "White blood cells are the immune system's main defenders."),
    ("What do we call a liquid turning into a gas?", "Evaporation", "Evaporation happens when molecules escape from a liquid's surface."),
]

ASTRONOMY = [
    ("How many planets are in the Solar System?", "Eight", "Pluto was reclassified as a dwarf planet in 2006."),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury orbits the Sun at about 58 million kilometers."),
    ("Which is the largest planet in the Solar System?", "Jupiter", "Jupiter is more massive than all the other planets combined."),
    ("Which planet is known as the Red Planet?", "Mars", "Iron oxide dust gives Mars its red color."),
    ("Which planet is famous for its bright rings?", "Saturn", "Saturn's rings are made mostly of ice and rock."),
    ("What is the hottest planet in the Solar System?", "Venus", "Venus's thick carbon dioxide atmosphere traps heat."),
    ("What is Earth's only natural satellite?", "The Moon", "The Moon orbits Earth about once every 27 days."),
    ("How long does Earth take to orbit the Sun?", "About 365.25 days", "The extra quarter day is why leap years exist."),
    ("How long does sunlight take to reach Earth?", "About 8 minutes", "Light covers the 150 million kilometers in about 8 minutes 20 seconds."),
    ("What is the closest star to Earth?", "The Sun", "The Sun is far closer than any other star."),
    ("Which galaxy contains the Solar System?", "The Milky Way", "The Solar System orbits the center of the Milky Way."),
    ("What is a light-year?", "The distance light travels in a year", "A light-year is about 9.46 trillion kilometers."),
    ("Which planet rotates tipped on its side?", "Uranus", "Uranus's axis is tilted about 98 degrees."),
    ("What causes Earth's seasons?", "The tilt of Earth's axis", "The tilt changes how directly sunlight strikes each hemisphere."),
    ("Which dwarf planet was once called the ninth planet?", "Pluto", "Pluto was counted as a planet from 1930 until 2006."),
]

HISTORY = [
    ("In which year did World War II end?", "1945", "The war ended with Japan's surrender in September 1945."),
    ("Who was the first President of the United States?", "George Washington", "Washington served as president from 1789 to 1797."),
    ("In which year did the Berlin Wall fall?", "1989", "The wall was opened on 9 November 1989."),
    ("Who was the main author of the US Declaration of Independence?", "Thomas Jefferson", "Jefferson wrote the first draft in 1776."),
    ("In which year did Columbus first reach the Americas?", "1492", "Columbus landed in the Bahamas in October 1492."),
    ("Who was the first Roman emperor?", "Augustus", "Augustus ruled from 27 BC until AD 14."),
    ("Which civilization built Machu Picchu?", "The Inca", "The Inca built it in the Andes of Peru in the 15th century."),
    ("In which year did the Titanic sink?", "1912", "It sank on 15 April 1912 after hitting an iceberg."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Leonardo painted it in the early 16th century."),
    ("Who developed the theory of general relativity?", "Albert Einstein", "Einstein published the theory in 1915."),
    ("Who is credited with inventing the telephone?", "Alexander Graham Bell", "Bell received the first US patent for it in 1876."),
    ("In which year did World War I begin?", "1914", "The war began in July 1914, a month after Archduke Franz Ferdinand was assassinated."),
    ("Who was the first woman to win a Nobel Prize?", "Marie Curie", "Curie shared the 1903 Nobel Prize in Physics."),
    ("Which empire built the Colosseum?", "The Roman Empire", "The Colosseum in Rome was completed in AD 80."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Shakespeare wrote the play in the 1590s."),
    ("In which year did humans first land on the Moon?", "1969", "Apollo 11 landed on the Moon on 20 July 1969."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Armstrong stepped onto the Moon during Apollo 11."),
    ("Who was the first person in space?", "Yuri Gagarin", "Gagarin orbited Earth on 12 April 1961."),
    ("Which country gave the Statue of Liberty to the USA?", "France", "The statue was a gift from France, dedicated in 1886."),
    ("Who introduced movable-type printing to Europe?", "Johannes Gutenberg", "Gutenberg developed his printing press around 1440."),
    ("In which year did the French Revolution begin?", "1789", "It began with the storming of the Bastille in July 1789."),
    ("Who led Britain for most of World War II?", "Winston Churchill", "Churchill was prime minister from 1940 to 1945."),
    ("Who led India's nonviolent independence movement?", "Mahatma Gandhi", "Gandhi championed nonviolent resistance to British rule."),
    ("In which year did the Soviet Union dissolve?", "1991", "The USSR formally dissolved in December 1991."),
    ("Who discovered penicillin?", "Alexander Fleming", "Fleming noticed its antibacterial effect in 1928."),
    ("Who formulated the laws of motion and universal gravitation?", "Isaac Newton", "Newton published them in the Principia in 1687."),
    ("Which people invented cuneiform writing?", "The Sumerians", "Sumerians in Mesopotamia developed it over 5,000 years ago."),
    ("Who became South Africa's president in 1994?", "Nelson Mandela", "Mandela won the country's first fully democratic election."),
    ("In which city was the US Declaration of Independence adopted?", "Philadelphia", "Congress adopted it in Philadelphia on 4 July 1776."),
    ("Who wrote On the Origin of Species?", "Charles Darwin", "Darwin published the book in 1859."),
    ("In which year was the Magna Carta sealed?", "1215", "King John sealed it at Runnymede in 1215."),
]

LANGUAGE = [
    ('What is the opposite of "hot"?', "Cold", "Hot and cold are opposite ends of temperature."),
    ('What is the plural of "mouse"?', "Mice", '"Mouse" has the irregular plural "mice".'),
    ('What is the plural of "child"?', "Children", '"Child" has the irregular plural "children".'),
    ('What is the past tense of "go"?', "Went", '"Go" is irregular: go, went, gone.'),
    ('What is the past tense of "run"?', "Ran", '"Run" is irregular: run, ran, run.'),
    ('Give a synonym for "happy".', "Joyful", '"Joyful" also means feeling great pleasure.'),
    ('What is the French word for "cat"?', "Chat", '"Chat" is the French noun for a male or generic cat.'),
    ('What is the Spanish word for "water"?', "Agua", '"Agua" is the everyday Spanish word for water.'),
    ('How do you say "thank you" in Japanese?', "Arigatō", '"Arigatō" is the common Japanese way to say thanks.'),
    ('What is the German word for "dog"?', "Hund", '"Hund" is the German noun for dog.'),
    ('How do you say "hello" in Spanish?', "Hola", '"Hola" is the standard Spanish greeting.'),
    ('What does the Latin phrase "carpe diem" mean?', "Seize the day", "The phrase comes from the Roman poet Horace."),
    ('What is the Italian word for "thank you"?', "Grazie", '"Grazie" is how Italians say thanks.'),
    ('What part of speech is "quickly"?', "An adverb", '"Quickly" describes how an action is done.'),
    ("How many letters are in the English alphabet?", "26", "The English alphabet runs from A to Z with 26 letters."),
    ("Which letter is most common in English text?", "E", "Frequency counts of English text consistently put E first."),
    ('What is the opposite of "ancient"?', "Modern", '"Ancient" means very old, while "modern" means recent.'),
    ('What is the plural of "cactus"?', "Cacti", '"Cactuses" is also accepted, but "cacti" is the traditional plural.', "Medium"),
    ('What is a word like "level" that reads the same backward called?', "A palindrome", "A palindrome reads the same in both directions."),
    ('What is the comparative form of "good"?', "Better", '"Good" is irregular: good, better, best.'),
    ('What is the superlative form of "bad"?', "Worst", '"Bad" is irregular: bad, worse, worst.'),
    ('How many syllables are in "banana"?', "Three", '"Banana" splits into ba-na-na.'),
    ('What is an antonym of "generous"?', "Stingy", '"Stingy" means unwilling to give or share.'),
    ("Which language has the most native speakers?", "Mandarin Chinese", "Mandarin has close to a billion native speakers."),
    ("What is the official language of Brazil?", "Portuguese", "Brazil was a Portuguese colony until 1822."),
    ("What is the official language of Austria?", "German", "Austrian German is the standard language of Austria."),
    ('What does the French word "bonjour" mean?', "Good day", '"Bonjour" is the standard French daytime greeting.'),
    ('What is the past participle of "write"?', "Written", '"Write" is irregular: write, wrote, written.'),
    ("How is the number 40 spelled in words?", "Forty", '"Forty" has no "u", unlike "four".'),
    ('What does the prefix "bi-" mean?', "Two", 'A "bicycle" is a cycle with two wheels.'),
    ('What is the Spanish word for "book"?', "Libro", '"Libro" is the Spanish noun for book.'),
    ('How do you say "thank you" in German?', "Danke", '"Danke" is the everyday German word for thanks.'),
    ('What is the opposite of "increase"?', "Decrease", "To decrease is to make or become smaller."),
    ('What is the plural of "goose"?', "Geese", '"Goose" forms its plural by changing the vowel.'),
    ("Which punctuation mark ends a direct question?", "A question mark", "Direct questions in English end with a question mark."),
]

EVERYDAY = [
    ("How many days are in a week?", "Seven", "The week runs from Monday to Sunday."),
    ("How many days are in a leap year?", "366", "A leap year adds 29 February to the usual 365 days."),
    ("How many hours are in a day?", "24", "Earth turns once relative to the Sun in about 24 hours."),
    ("How many minutes are in an hour?", "60", "An hour is divided into 60 minutes."),
    ("How many months have 31 days?", "Seven", "January, March, May, July, August, October and December have 31 days."),
    ("How many sides does a hexagon have?", "Six", 'The prefix "hexa-" means six.'),
    ("What color do you get by mixing blue and yellow paint?", "Green", "Blue and yellow pigments combine to make green."),
    ("What are the three primary colors of light?", "Red, green and blue", "Mixing all three at full strength gives white light."),
    ("How many cards are in a standard deck?", "52", "A standard deck has four suits of 13 cards."),
    ("How many players does a soccer team have on the field?", "11", "Each side fields ten outfield players and a goalkeeper."),
    ("How many strings does a standard guitar have?", "Six", "A standard guitar is tuned E, A, D, G, B, E."),
    ("Which month has the fewest days?", "February", "February has 28 days, or 29 in a leap year."),
    ("How many keys does a standard piano have?", "88", "A standard piano has 52 white keys and 36 black keys."),
    ("What shape has three sides?", "A triangle", "A triangle is a polygon with three sides and three angles."),
    ("How many zeros are in one million?", "Six", "One million is written 1,000,000."),
    ("Which meal is eaten in the morning?", "Breakfast", "Breakfast breaks the overnight fast."),
    ("How many sides does a stop sign have?", "Eight", "A standard stop sign is a red octagon."),
    ("How many years are in a century?", "100", "A century is a period of one hundred years."),
    ("How many years are in a decade?", "10", "A decade is a period of ten years."),
    ("What does a thermometer measure?", "Temperature", "A thermometer shows how hot or cold something is."),
    ("Which tool shows which way is north?", "A compass", "A compass needle aligns with Earth's magnetic field."),
    ("How many teeth does an adult usually have?", "32", "The full adult set of 32 includes four wisdom teeth."),
    ("Which fruit is dried to make raisins?", "Grapes", "Raisins are grapes dried in the sun or in dryers."),
    ("What is frozen water called?", "Ice", "Water becomes solid ice at 0 °C."),
    ("How many wheels does a tricycle have?", "Three", 'The prefix "tri-" means three.'),
    ("Which day comes after Friday?", "Saturday", "Saturday follows Friday in the seven-day week."),
    ("Which season comes after winter?", "Spring", "The seasons run winter, spring, summer, autumn."),
    ("How many legs does a typical chair have?", "Four", "Most chairs have four legs, although designs vary.", "Medium"),
    ("What do bees make from flower nectar?", "Honey", "Bees evaporate and store nectar in the hive as honey."),
]

DEFINITIONS = [
    ("What is photosynthesis?", "How plants make food from light", "Plants use light, water and carbon dioxide to make sugar and oxygen."),
    ("What is a noun?", "A word that names a thing", "Nouns name people, places, things or ideas, like \"city\"."),
    ("What is democracy?", "Government by the people", "Citizens choose their leaders, usually through free elections."),
    ("What is inflation?", "A general rise in prices", "Inflation means the same money buys less over time."),
    ("What is an ecosystem?", "Living things and their environment", "Organisms interact with each other and with air, water and soil."),
    ("What is a prime number?", "A number with exactly two divisors", "A prime is divisible only by 1 and itself, like 7."),
    ("What is gravity?", "The attraction between masses", "Gravity pulls objects with mass toward each other."),
    ("What is a verb?", "A word for an action or state", 'Examples include "run", "think" and "be".'),
    ("What is a peninsula?", "Land almost surrounded by water", "A peninsula joins the mainland on one side, like Italy."),
    ("What is an atom?", "The smallest unit of an element", "An atom is a nucleus surrounded by electrons."),
    ("What is a mammal?", "A warm-blooded animal that nurses its young", "Mammals feed their young milk and usually have hair."),
    ("What is erosion?", "The wearing away of land", "Wind, water and ice gradually carry away soil and rock."),
    ("What is a metaphor?", "A figure of speech comparing two things", '"Time is a thief" describes time as something else.'),
    ("What is a budget?", "A plan for spending and saving", "A budget compares expected income with planned expenses."),
    ("What is a fossil?", "Preserved remains of ancient life", "Fossils often form when organisms are buried in sediment."),
    ("What is a volcano?", "An opening where molten rock erupts", "Magma escapes through the crust as lava, ash and gas."),
    ("What is a synonym?", "A word with the same meaning as another", '"Big" and "large" are synonyms.'),
    ("What is a hypothesis?", "A testable proposed explanation", "Scientists test hypotheses with experiments and observations."),
    ("What is friction?", "A force that resists sliding", "Friction acts where two surfaces touch and move against each other."),
    ("What is a carnivore?", "An animal that eats meat", "Lions and wolves are carnivores."),
    ("What is a haiku?", "A three-line Japanese poem", "A haiku traditionally has lines of 5, 7 and 5 syllables."),
    ("What is a river delta?", "Land built up at a river's mouth", "A river deposits sediment where it slows down at the sea."),
    ("What is a molecule?", "Two or more bonded atoms", "Water is a molecule of two hydrogen atoms and one oxygen atom."),
    ("What is a biography?", "An account of someone's life", "A biography is written by someone other than its subject."),
    ("What is an omnivore?", "An animal that eats plants and animals", "Humans and bears are omnivores."),
    ("What is a vaccine?", "A preparation that trains the immune system", "Vaccines teach the body to recognize a germ before infection."),
    ("What is interest on a loan?", "The cost of borrowing money", "Interest is usually a percentage of the amount borrowed."),
    ("What is an island?", "Land surrounded by water", "Islands are smaller than continents and fully surrounded by water."),
]

UNITS = [
    ("How many centimeters are in a meter?", "100", 'The prefix "centi-" means one hundredth.'),
    ("How many meters are in a kilometer?", "1,000", 'The prefix "kilo-" means one thousand.'),
    ("How many grams are in a kilogram?", "1,000", "A kilogram is one thousand grams."),
    ("How many milliliters are in a liter?", "1,000", 'The prefix "milli-" means one thousandth.'),
    ("How many seconds are in an hour?", "3,600", "An hour is 60 minutes of 60 seconds each."),
    ("How many inches are in a foot?", "12", "A foot is defined as exactly 12 inches."),
    ("How many feet are in a yard?", "3", "A yard is defined as exactly 3 feet."),
    ("How many centimeters are in an inch?", "2.54", "The inch is defined as exactly 2.54 centimeters."),
    ("How many kilometers are in a mile?", "About 1.609", "A mile is exactly 1.609344 kilometers."),
    ("How many ounces are in a pound?", "16", "An avoirdupois pound is 16 ounces."),
    ("About how many pounds are in a kilogram?", "About 2.2", "One kilogram is about 2.205 pounds."),
    ("What is 0 °C in Fahrenheit?", "32 °F", "Water's freezing point is 0 °C, which is 32 °F."),
    ("What is 100 °C in Fahrenheit?", "212 °F", "Multiplying 100 by 9/5 and adding 32 gives 212."),
    ("What is 25 °C in Fahrenheit?", "77 °F", "Multiplying 25 by 9/5 and adding 32 gives 77."),
    ("How many milligrams are in a gram?", "1,000", "A milligram is one thousandth of a gram."),
    ("How many square meters are in a hectare?", "10,000", "A hectare is a square 100 meters on each side."),
    ("What is the SI unit of temperature?", "The kelvin", "The kelvin scale starts at absolute zero."),
    ("What is the SI unit of electric current?", "The ampere", "The ampere is written with the symbol A."),
    ("Which unit measures power?", "The watt", "One watt is one joule per second."),
    ('What does "km/h" stand for?', "Kilometers per hour", "It measures speed as distance in kilometers per hour."),
    ("How many minutes are in a day?", "1,440", "A day is 24 hours of 60 minutes each."),
    ("How many days are in a fortnight?", "14", "A fortnight is two weeks."),
    ("What is the SI unit of mass?", "The kilogram", "The kilogram is the only SI base unit with a prefix."),
    ("How many liters are in a cubic meter?", "1,000", "A liter is one cubic decimeter."),
    ("How many millimeters are in a centimeter?", "10", "A centimeter is ten millimeters."),
    ("How many minutes are in 1.5 hours?", "90", "One and a half times 60 minutes is 90 minutes."),
    ("How many quarts are in a US gallon?", "4", "A US gallon is four quarts."),
    ("How many hertz are in a kilohertz?", "1,000", "A kilohertz is one thousand cycles per second."),
]

ANIMALS = [
    ("What is the largest animal ever known?", "The blue whale", "Blue whales can reach about 30 meters in length."),
    ("What is the fastest land animal?", "The cheetah", "Cheetahs can sprint at around 100 km/h."),
    ("How many legs does a spider have?", "Eight", "Spiders are arachnids, which have eight legs."),
    ("How many legs does an insect have?", "Six", "All adult insects have three pairs of legs."),
    ("What is a baby kangaroo called?", "A joey", "Joeys develop inside their mother's pouch."),
    ("What is a group of lions called?", "A pride", "A pride is usually several related females, their cubs and a few males."),
    ("What do giant pandas mainly eat?", "Bamboo", "Bamboo makes up about 99 percent of a giant panda's diet."),
    ("What is the tallest animal?", "The giraffe", "Giraffes can grow to about 5.5 meters tall."),
    ("How many hearts does an octopus have?", "Three", "Two hearts pump blood through the gills and one through the body."),
    ("Which mammal is capable of true flight?", "The bat", "Bats are the only mammals capable of powered flight."),
    ("What is a baby cat called?", "A kitten", "Young cats are called kittens."),
    ("What is a baby dog called?", "A puppy", "Young dogs are called puppies."),
    ("Are whales fish or mammals?", "Mammals", "Whales breathe air and nurse their young with milk."),
    ("What do caterpillars turn into?", "Butterflies or moths", "They transform through metamorphosis as pupae."),
    ("What is the largest living bird?", "The ostrich", "Ostriches can stand about 2.7 meters tall."),
    ("Which animal is called the king of the jungle?", "The lion", "The nickname reflects the lion's role as a top predator."),
    ("Where do polar bears live?", "The Arctic", "Polar bears hunt seals on Arctic sea ice."),
    ("What do herbivores eat?", "Plants", "Herbivores such as cows and deer eat only plants."),
    ("How many legs does a crab have?", "Ten", "Crabs are decapods, with ten legs including two claws."),
    ("What is a female sheep called?", "A ewe", "Female sheep are ewes and males are rams."),
    ("What is an adult male chicken called?", "A rooster", "Roosters are adult male chickens, also called cocks."),
    ("What is the largest living cat species?", "The tiger", "Large male tigers can weigh over 300 kilograms."),
    ("How do fish breathe?", "Through their gills", "Gills take dissolved oxygen from the water."),
    ("Which African animal has black and white stripes?", "The zebra", "Each zebra has a unique stripe pattern."),
    ("Which mammal is famous for moving very slowly?", "The sloth", "Sloths rarely move faster than a few meters per minute.", "Medium"),
    ("How many eyes does a honeybee have?", "Five", "Bees have two compound eyes and three simple eyes."),
    ("What is a young frog called?", "A tadpole", "Tadpoles live in water and breathe through gills."),
    ("Which sea animal has eight arms?", "The octopus", 'The name "octopus" means "eight feet" in Greek.'),
    ("What do koalas mainly eat?", "Eucalyptus leaves", "Koalas feed almost entirely on eucalyptus leaves."),
    ("What is a group of wolves called?", "A pack", "Wolves live and hunt in family packs."),
]

COMPUTING = [
    ('What does "CPU" stand for?', "Central processing unit", "The CPU executes a computer's program instructions."),
    ('What does "RAM" stand for?', "Random-access memory", "RAM holds the data a computer is actively using."),
    ('What does "HTML" stand for?', "HyperText Markup Language", "HTML describes the structure of web pages."),
    ("How many bits are in a byte?", "8", "A byte is a group of eight bits."),
    ("What is 5 written in binary?", "101", "5 equals 4 plus 1, so the bits for 4 and 1 are set."),
    ("What is binary 1010 in decimal?", "10", "1010 in binary is 8 plus 2."),
    ('What does "URL" stand for?', "Uniform Resource Locator", "A URL is the address of a resource on the web."),
    ("Who created the Python programming language?", "Guido van Rossum", "He released the first version of Python in 1991."),
    ('What does "GPU" stand for?', "Graphics processing unit", "GPUs run many simple calculations in parallel."),
    ("What is hexadecimal FF in decimal?", "255", "F is 15, so FF is 15 times 16 plus 15."),
    ('What does "HTTP" stand for?', "Hypertext Transfer Protocol", "HTTP is the protocol browsers use to fetch web pages."),
    ("Which data structure is last-in, first-out?", "A stack", "The last item pushed onto a stack is the first popped off."),
    ("Which data structure is first-in, first-out?", "A queue", "Items leave a queue in the order they arrived."),
    ("What is the time complexity of binary search?", "O(log n)", "Each step halves the remaining search range."),
    ("Which company makes the Windows operating system?", "Microsoft", "Microsoft released the first version of Windows in 1985."),
    ('What does "AI" stand for?', "Artificial intelligence", "AI is the field of building systems that perform intelligent tasks."),
    ("In Python, what does len([1, 2, 3]) return?", "3", "len returns the number of items in the list."),
    ("Which symbol starts a comment in Python?", "#", "Python ignores everything after # on a line."),
    ('What does "SQL" stand for?', "Structured Query Language", "SQL is used to query and manage relational databases."),
    ('What does "USB" stand for?', "Universal Serial Bus", "USB is a standard for connecting devices to computers."),
    ("Who created the Linux kernel?", "Linus Torvalds", "Torvalds started the Linux kernel in 1991."),
    ("What is a software bug?", "An error that causes wrong behavior", "Bugs are mistakes in code or design."),
    ('What does "PDF" stand for?', "Portable Document Format", "PDF files look the same on any device."),
    ("What is the largest unsigned 8-bit integer?", "255", "Eight bits give 256 values, from 0 to 255."),
    ("In Python, what is 7 // 2?", "3", "Floor division discards the fractional part."),
    ("What is Git used for?", "Version control", "Git records changes to files so work can be tracked and shared."),
    ('In machine learning, what does "LoRA" stand for?', "Low-Rank Adaptation", "LoRA fine-tunes a model by training small low-rank weight updates."),
    ("What does a compiler do?", "Translates source code into machine code", "Compiled programs can then run directly on the processor."),
    ("What is the value of True and False in Python?", "False", "The and operator is true only when both sides are true."),
    ("How many values can a single bit hold?", "Two", "A bit is either 0 or 1."),
    ("What is an IP address?", "A number identifying a device on a network", "Routers use IP addresses to deliver data to the right machine."),
]

MATH = [
    ("What is the sum of the angles in a triangle?", "180 degrees", "This holds for every triangle on a flat plane."),
    ("What is pi to two decimal places?", "3.14", "Pi is approximately 3.14159."),
    ("How many degrees are in a right angle?", "90", "A right angle is a quarter of a full 360-degree turn."),
    ("Is 91 a prime number?", "No", "91 equals 7 times 13."),
    ("Is 97 a prime number?", "Yes", "97 has no divisors other than 1 and itself."),
    ("What is the smallest prime number?", "2", "2 is the only even prime number."),
    ("What is 3/4 as a percentage?", "75%", "Three quarters of 100 is 75."),
    ("What is 0.5 as a fraction?", "1/2", "Five tenths simplifies to one half."),
    ("A pen costs $3. How much do 4 pens cost?", "$12", "Four pens at $3 each cost 4 times 3 dollars."),
    ("A train moves at 60 km/h. How far does it go in 3 hours?", "180 km", "Distance is speed multiplied by time."),
    ("What is the perimeter of a square with 5 cm sides?", "20 cm", "A square's perimeter is four times its side length."),
    ("What is the area of a 4 m by 6 m rectangle?", "24 square meters", "A rectangle's area is its length times its width."),
    ("What is the Roman numeral for 10?", "X", "In Roman numerals X stands for ten."),
    ("What is the Roman numeral for 50?", "L", "In Roman numerals L stands for fifty."),
    ("What number does the Roman numeral XIV represent?", "14", "X is 10 and IV is 4, so XIV is 14."),
    ("What is an even number?", "A whole number divisible by 2", "Even numbers like 4 and 10 split into two equal whole parts."),
]

# Questions a careful assistant cannot or should not answer with certainty:
# they teach that the format still holds when the answer is "I don't know".
UNCERTAIN = [
    ("What will the weather be in London next Tuesday?", "I cannot know", "I have no live weather data and forecasts that far ahead are unreliable.", "Low"),
    ("What number am I thinking of?", "I cannot know", "I have no access to your thoughts.", "Low"),
    ("Who will win the next FIFA World Cup?", "Unknown", "The result depends on matches that have not been played yet.", "Low"),
    ("What is the price of Bitcoin right now?", "I cannot say", "Prices change constantly and I have no live market data.", "Low"),
    ("How many grains of sand are on Earth?", "Roughly 10^18 to 10^19", "This is a rough estimate that cannot be verified.", "Low"),
    ("How many insect species exist?", "Perhaps about 5.5 million", "Only about one million have been described, so totals are estimates.", "Low"),
    ("What is the population of the world?", "About 8 billion", "The UN estimated it passed 8 billion in November 2022.", "Medium"),
    ("What time is it right now?", "I cannot know", "I have no clock and do not know your time zone.", "Low"),
    ("How many people will live on Mars in 2100?", "Unknown", "Future settlement of Mars is highly uncertain.", "Low"),
    ("How old is the universe?", "About 13.8 billion years", "Measurements of the cosmic microwave background give this estimate.", "Medium"),
    ("How many languages are spoken in the world?", "About 7,000", "Counts vary because the line between language and dialect is blurry.", "Medium"),
    ("How old is the Earth?", "About 4.5 billion years", "Radiometric dating of meteorites gives about 4.54 billion years.", "Medium"),
    ("Will it rain tomorrow where I live?", "I cannot know", "I do not know your location and have no weather data.", "Low"),
    ("What is my name?", "I do not know", "You have not told me your name.", "Low"),
    ("How many stars are in the Milky Way?", "Roughly 100 to 400 billion", "Estimates vary because most stars are too faint to count.", "Medium"),
]


def arithmetic() -> list[tuple[str, str, str]]:
    """Arithmetic facts whose answers are computed, so they cannot be wrong."""
    facts = []
    for a, b in [(17, 25), (48, 36), (123, 77), (250, 375), (999, 1), (64, 29), (305, 198), (1200, 850)]:
        facts.append((f"What is {a} + {b}?", f"{a + b:,}", f"Adding {a:,} and {b:,} gives {a + b:,}."))
    for a, b in [(100, 37), (81, 19), (1000, 456), (73, 28), (500, 125), (62, 47)]:
        facts.append((f"What is {a} minus {b}?", f"{a - b:,}", f"Taking {b} away from {a:,} leaves {a - b:,}."))
    for a, b in [(7, 8), (12, 12), (9, 6), (15, 4), (25, 8), (13, 7), (11, 11), (14, 3), (50, 20), (6, 7)]:
        facts.append((f"What is {a} times {b}?", f"{a * b:,}", f"{a} multiplied by {b} equals {a * b:,}."))
    for a, b in [(144, 12), (81, 9), (56, 7), (100, 4), (96, 8), (63, 9)]:
        facts.append((f"What is {a} divided by {b}?", str(a // b), f"{b} times {a // b} equals {a}, so the answer is {a // b}."))
    for n in (9, 13, 15, 20):
        facts.append((f"What is {n} squared?", str(n * n), f"{n} times {n} equals {n * n}."))
    for n in (7, 11, 13, 15):
        facts.append((f"What is the square root of {n * n}?", str(n), f"{n} times {n} equals {n * n}."))
    for pct, whole in [(10, 250), (25, 80), (50, 46), (15, 200), (20, 45)]:
        value = Fraction(pct * whole, 100)
        assert value.denominator == 1, "keep percentage answers whole"
        facts.append((f"What is {pct}% of {whole}?", str(value), f"{pct} hundredths of {whole} is {value}."))
    for base, exp in [(2, 10), (3, 4), (10, 3)]:
        facts.append((f"What is {base} to the power of {exp}?", f"{base ** exp:,}", f"Multiplying {exp} copies of {base} gives {base ** exp:,}."))
    return facts


TOPICS = {
    "geography": GEOGRAPHY,
    "science": SCIENCE,
    "astronomy": ASTRONOMY,
    "arithmetic": arithmetic(),
    "math": MATH,
    "history": HISTORY,
    "language": LANGUAGE,
    "everyday": EVERYDAY,
    "definitions": DEFINITIONS,
    "units": UNITS,
    "animals": ANIMALS,
    "computing": COMPUTING,
    "uncertain": UNCERTAIN,
}


def format_reply(answer: str, explanation: str, confidence: str) -> str:
    return (
        "[LEMA_REPLY]\n"
        f"Answer: {answer}\n"
        f"Explanation: {explanation}\n"
        f"Confidence: {confidence}\n"
        "[/LEMA_REPLY]"
    )


def to_example(fact: tuple) -> dict:
    question, answer, explanation, *rest = fact
    confidence = rest[0] if rest else "High"
    # Guard the invariants the format relies on, so a typo in a table fails
    # here rather than producing a subtly malformed training example.
    assert confidence in ("High", "Medium", "Low"), fact
    assert explanation.endswith("."), f"explanation must be one full sentence: {fact}"
    assert "\n" not in question + answer + explanation, fact
    assert answer and not answer.endswith("."), fact
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": format_reply(answer, explanation, confidence)},
        ]
    }


def split() -> tuple[list[dict], list[dict]]:
    """Hold back HELDOUT_PER_TOPIC questions from every topic; shuffle the rest."""
    seen: set[str] = set()
    for facts in TOPICS.values():
        for fact in facts:
            key = fact[0].strip().lower()
            assert key not in seen, f"duplicate question: {fact[0]}"
            seen.add(key)
    rng = random.Random(SEED)
    train, heldout = [], []
    for name in sorted(TOPICS):
        facts = list(TOPICS[name])
        rng.shuffle(facts)
        heldout += facts[:HELDOUT_PER_TOPIC]
        train += facts[HELDOUT_PER_TOPIC:]
    # Interleave topics so any prefix of the file is a representative sample.
    rng.shuffle(train)
    return [to_example(f) for f in train], [to_example(f) for f in heldout]


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def main() -> None:
    train, heldout = split()
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} heldout examples to {OUT_DIR}")


if __name__ == "__main__":
    main()
